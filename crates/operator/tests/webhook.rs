//! The sidecar injector on a real kube-apiserver, which calls it over HTTPS and trusts it
//! only through the caBundle the operator patches in; the namespace enforces the
//! `restricted` Pod Security Standard, so an injected sidecar that breaks it fails the test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Container, Pod, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use support::{EXAMPLES, Operator, eventually, plane_with_crd};
use virus_scan_operator::controller::ANNOTATION_POLICY;
use virus_scan_operator::crd::{GatewayState, VirusScanPolicy};
use virus_scan_operator::inject::{ANNOTATION_HASH, InjectDefaults, SIDECAR, injection_hash};
use virus_scan_operator::{certs, inject, webhook};
use virus_scanner_test_support::http_get;
use virus_scanner_test_support::kube::ControlPlane;

const NS: &str = "tenant-a";
const WEBHOOK: &str = "virus-scan-operator";
const ADMISSIONS: &str = "virus_scan_operator_admission_requests_total";

fn webhook_configuration(port: u16) -> String {
    format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{ name: {WEBHOOK} }}
webhooks:
- name: inject.virusscan.aether-platform.io
  admissionReviewVersions: ["v1"]
  sideEffects: None
  failurePolicy: Fail
  timeoutSeconds: 5
  reinvocationPolicy: IfNeeded
  namespaceSelector:
    matchExpressions:
    - {{ key: virusscan.aether-platform.io/injection, operator: In, values: [enabled] }}
    - {{ key: kubernetes.io/metadata.name, operator: NotIn, values: [kube-system, default] }}
  objectSelector:
    matchExpressions:
    - {{ key: virusscan.aether-platform.io/inject, operator: NotIn, values: ["false"] }}
  clientConfig:
    url: https://127.0.0.1:{port}/mutate
  rules:
  - {{ operations: [CREATE], apiGroups: [""], apiVersions: [v1], resources: [pods] }}
"#
    )
}

fn apply(plane: &ControlPlane, yaml: &str) {
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    plane.kubectl(&["apply", "-f", &file.path().display().to_string()]);
}

/// The plane with the tenant namespace (injection on, and `labels`) and the example policy.
async fn tenant_plane(labels: &[&str]) -> ControlPlane {
    let plane = tokio::task::spawn_blocking(plane_with_crd).await.unwrap();
    plane.kubectl(&["create", "namespace", NS]);
    let mut label = vec![
        "label",
        "namespace",
        NS,
        "virusscan.aether-platform.io/injection=enabled",
    ];
    label.extend_from_slice(labels);
    plane.kubectl(&label);
    plane.kubectl(&["apply", "-f", &format!("{EXAMPLES}/virusscanpolicy.yaml")]);
    plane
}

/// The plane, the tenant namespace (injection on, `restricted` enforced), the example
/// policy, an operator and the webhook configuration with the caBundle patched in.
async fn setup(extra_env: &[(&str, String)]) -> (ControlPlane, Client, Operator) {
    let plane = tenant_plane(&["pod-security.kubernetes.io/enforce=restricted"]).await;
    let operator = Operator::start_with(&plane, "op-0", extra_env);
    apply(&plane, &webhook_configuration(operator.webhook_port));
    let client = plane.client().await;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    eventually(Duration::from_secs(30), "caBundle patched", || async {
        ca_bundle(&configs).await.is_some()
    })
    .await;
    (plane, client, operator)
}

async fn ca_bundle(configs: &Api<MutatingWebhookConfiguration>) -> Option<Vec<u8>> {
    let config = configs.get(WEBHOOK).await.ok()?;
    config.webhooks?[0]
        .client_config
        .ca_bundle
        .clone()
        .map(|b| b.0)
}

/// A pod that passes `restricted` on its own.
fn pod(name: &str, labels: Value, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels, "annotations": annotations },
        "spec": {
            "securityContext": { "runAsNonRoot": true, "seccompProfile": { "type": "RuntimeDefault" } },
            "containers": [{
                "name": "envoy",
                "image": "envoyproxy/envoy:v1.40.0",
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "capabilities": { "drop": ["ALL"] }
                }
            }]
        }
    }))
    .unwrap()
}

fn sidecars(pod: &Pod) -> Vec<Container> {
    let spec = pod.spec.as_ref().unwrap();
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .filter(|c| c.name == SIDECAR)
        .cloned()
        .collect()
}

/// Creates a pod, retrying while the API server has not yet picked up the webhook's
/// configuration or certificate (the webhook fails closed meanwhile).
async fn create_injected(api: &Api<Pod>, pod: &Pod) -> Pod {
    let started = Instant::now();
    loop {
        match api.create(&PostParams::default(), pod).await {
            Ok(created) if !sidecars(&created).is_empty() => return created,
            Ok(created) => panic!("created without a sidecar: {created:?}"),
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "the webhook never admitted the pod: {e}"
                );
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

/// Envoy Gateway's default deploy mode: the proxies of tenant-a's Gateway run in
/// envoy-gateway-system, labelled with the Gateway's name and namespace, and get tenant-a's
/// sidecar from its Envoy Gateway policy; the same labels on a pod of any other namespace
/// claim nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_gateway_proxies_get_the_sidecar_of_their_gateways_namespace() {
    let (plane, client, _operator) = setup(&[]).await;
    // Envoy Gateway's CRDs, so that the policy's objects are written: a gateway counts as
    // protected only once they are.
    let crds = support::gateway_crds().join("envoy-gateway.yaml");
    plane.kubectl(&["apply", "--server-side", "-f", &crds.display().to_string()]);
    plane.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/envoyextensionpolicies.gateway.envoyproxy.io",
    ]);
    for ns in ["envoy-gateway-system", "tenant-b"] {
        plane.kubectl(&["create", "namespace", ns]);
        plane.kubectl(&[
            "label",
            "namespace",
            ns,
            "virusscan.aether-platform.io/injection=enabled",
        ]);
    }
    plane.kubectl(&[
        "apply",
        "-f",
        &format!("{EXAMPLES}/virusscanpolicy-envoy-gateway.yaml"),
    ]);
    let labels = json!({
        "gateway.envoyproxy.io/owning-gateway-name": "web",
        "gateway.envoyproxy.io/owning-gateway-namespace": NS
    });
    let proxies: Api<Pod> = Api::namespaced(client.clone(), "envoy-gateway-system");
    let mut created = None;
    for attempt in 0..50 {
        let name = format!("envoy-web-{attempt}");
        match proxies
            .create(
                &PostParams::default(),
                &pod(&name, labels.clone(), json!({})),
            )
            .await
        {
            Ok(p) if !sidecars(&p).is_empty() => {
                created = Some(p);
                break;
            }
            // The webhook (fail closed) or its policy cache is not there yet.
            _ => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
    let proxy = created.expect("an Envoy Gateway proxy with the sidecar");
    let annotations = proxy.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(annotations[ANNOTATION_POLICY], "web");
    let env: Vec<(String, String)> = sidecars(&proxy)[0]
        .env
        .iter()
        .flatten()
        .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
        .collect();
    assert!(
        env.contains(&("TENANT".to_owned(), NS.to_owned())),
        "{env:?}"
    );

    // The policy counts the proxy where it runs, under its Gateway.
    let policies: Api<VirusScanPolicy> = Api::namespaced(client.clone(), NS);
    let protected = |state: GatewayState, pods: i32, injected: i32| {
        let policies = policies.clone();
        async move {
            policies
                .get("web")
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| {
                    s.gateways.len() == 1
                        && s.gateways[0].name == "gateway/web"
                        && s.gateways[0].namespace == "envoy-gateway-system"
                        && s.gateways[0].state == state
                        && (s.gateways[0].pods, s.gateways[0].injected) == (pods, injected)
                        && s.matched_pods == pods
                })
        }
    };
    eventually(
        Duration::from_secs(30),
        "the injected proxy protects its Gateway",
        || protected(GatewayState::Protected, 1, 1),
    )
    .await;
    let p = policies.get("web").await.unwrap();
    assert_eq!(
        p.status.as_ref().unwrap().protected_gateways.as_deref(),
        Some("1/1")
    );
    // A proxy that is opted out runs unscanned: the Gateway is not protected, and says why.
    let mut opted_out = labels.clone();
    opted_out["virusscan.aether-platform.io/inject"] = json!("false");
    let bare = proxies
        .create(
            &PostParams::default(),
            &pod("envoy-web-bare", opted_out, json!({})),
        )
        .await
        .unwrap();
    assert!(sidecars(&bare).is_empty());
    eventually(Duration::from_secs(30), "the bare proxy shows", || {
        protected(GatewayState::NotInjected, 2, 1)
    })
    .await;
    let p = policies.get("web").await.unwrap();
    let s = p.status.unwrap();
    assert!(
        s.gateways[0].message.contains("envoy-web-bare (opted out)"),
        "{:?}",
        s.gateways
    );
    assert_eq!(s.protected_gateways.as_deref(), Some("0/1"));
    let cond = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Protected")
        .unwrap();
    assert_eq!(
        (cond.status.as_str(), cond.reason.as_str()),
        ("False", "GatewaysUnprotected")
    );

    let elsewhere: Api<Pod> = Api::namespaced(client.clone(), "tenant-b");
    let claimed = elsewhere
        .create(
            &PostParams::default(),
            &pod("claims-tenant-a", labels, json!({})),
        )
        .await
        .unwrap();
    assert!(sidecars(&claimed).is_empty(), "{claimed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matching_pod_gets_the_restricted_sidecar_exactly_once() {
    let (plane, client, mut operator) = setup(&[]).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);

    let created = create_injected(&pods, &pod("gw-1", json!({"app": "gateway"}), json!({}))).await;
    let injected = sidecars(&created);
    assert_eq!(injected.len(), 1);
    let sidecar = &injected[0];
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    let init = created
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap();
    assert_eq!(init[0].name, SIDECAR, "the native sidecar starts first");
    let sc = sidecar.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_non_root, Some(true));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    assert_eq!(
        sc.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_owned()][..])
    );
    assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
    let env: Vec<(String, String)> = sidecar
        .env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    for (k, v) in [
        ("REDIS_HOST", "virus-scanner-redis.virus-scanner.svc"),
        ("MAX_BODY_MB", "50"),
        ("SCAN_TIMEOUT_SECONDS", "30"),
        ("FAIL_OPEN", "false"),
        ("INFECTED_STATUS", "406"),
        ("GRPC_ADDR", "127.0.0.1:50051"),
        ("TENANT", NS),
        ("POLICY", "gateway"),
    ] {
        assert!(
            env.contains(&(k.to_owned(), v.to_owned())),
            "{k}={v} missing in {env:?}"
        );
    }
    assert!(sidecar.startup_probe.is_some() && sidecar.readiness_probe.is_some());
    let annotations = created.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        annotations["virusscan.aether-platform.io/policy"],
        "gateway"
    );
    assert_eq!(
        annotations["virusscan.aether-platform.io/policy-generation"],
        "1"
    );
    assert_eq!(
        annotations["virusscan.aether-platform.io/injected-hash"].len(),
        64
    );

    // Not selected, or opted out: unchanged.
    let plain = pods
        .create(
            &PostParams::default(),
            &pod("billing", json!({"app": "billing"}), json!({})),
        )
        .await
        .unwrap();
    assert!(sidecars(&plain).is_empty());
    assert!(plain.metadata.annotations.is_none());
    let out = pods
        .create(
            &PostParams::default(),
            &pod(
                "gw-out",
                json!({"app": "gateway"}),
                json!({"virusscan.aether-platform.io/inject": "false"}),
            ),
        )
        .await
        .unwrap();
    assert!(sidecars(&out).is_empty());
    // An opt-out label keeps the pod from ever reaching the webhook.
    let before = operator.metric(ADMISSIONS);
    let labelled = pods
        .create(
            &PostParams::default(),
            &pod(
                "gw-out-label",
                json!({"app": "gateway", "virusscan.aether-platform.io/inject": "false"}),
                json!({}),
            ),
        )
        .await
        .unwrap();
    assert!(sidecars(&labelled).is_empty());
    assert_eq!(operator.metric(ADMISSIONS), before);

    // A pod that already carries the sidecar keeps exactly one; re-applying too.
    let mut copy = created.clone();
    copy.metadata =
        serde_json::from_value(json!({"name": "gw-copy", "labels": {"app": "gateway"}})).unwrap();
    copy.status = None;
    let copy = pods.create(&PostParams::default(), &copy).await.unwrap();
    assert_eq!(sidecars(&copy).len(), 1);
    let manifest = tempfile::Builder::new().suffix(".json").tempfile().unwrap();
    let mut applied =
        serde_json::to_value(pod("gw-applied", json!({"app": "gateway"}), json!({}))).unwrap();
    applied["apiVersion"] = json!("v1");
    applied["kind"] = json!("Pod");
    applied["metadata"]["namespace"] = json!(NS);
    std::fs::write(manifest.path(), applied.to_string()).unwrap();
    let path = manifest.path().display().to_string();
    plane.kubectl(&["apply", "-f", &path]);
    plane.kubectl(&["apply", "-f", &path]);
    assert_eq!(sidecars(&pods.get("gw-applied").await.unwrap()).len(), 1);

    // Two policies selecting one pod: refused, naming both.
    let second = std::fs::read_to_string(format!("{EXAMPLES}/virusscanpolicy.yaml"))
        .unwrap()
        .replace("name: gateway\n", "name: second\n");
    apply(&plane, &second);
    let started = Instant::now();
    let refusal = loop {
        let attempt = pods
            .create(
                &PostParams::default(),
                &pod("gw-two", json!({"app": "gateway"}), json!({})),
            )
            .await;
        match attempt {
            Err(e) => break e.to_string(),
            Ok(_) => {
                // The webhook's policy cache has not seen the second policy yet.
                pods.delete("gw-two", &Default::default()).await.unwrap();
                assert!(started.elapsed() < Duration::from_secs(20), "never refused");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    };
    assert!(refusal.contains("gateway, second"), "{refusal}");
    plane.kubectl(&["delete", "vsp", "second", "-n", NS]);

    // kube-system is excluded by the namespaceSelector even when labelled.
    plane.kubectl(&[
        "label",
        "namespace",
        "kube-system",
        "virusscan.aether-platform.io/injection=enabled",
    ]);
    let before = operator.metric(ADMISSIONS);
    let system: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let sys = system
        .create(
            &PostParams::default(),
            &pod("gw-sys", json!({"app": "gateway"}), json!({})),
        )
        .await
        .unwrap();
    assert!(sidecars(&sys).is_empty());
    assert_eq!(operator.metric(ADMISSIONS), before);

    // Malformed reviews: 400 with a message, and the webhook keeps serving.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let secret = secrets
        .get("virus-scan-operator-webhook-tls")
        .await
        .unwrap();
    let bundle = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bundle.path(), &secret.data.unwrap()["ca-bundle.crt"].0).unwrap();
    let url = format!("https://127.0.0.1:{}/mutate", operator.webhook_port);
    for (body, message) in [
        ("garbage", "malformed AdmissionReview"),
        ("{}", "malformed AdmissionReview"),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":5}}"#,
            "malformed AdmissionReview",
        ),
        (
            r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#,
            "without a request",
        ),
    ] {
        let out = std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "--cacert"])
            .arg(bundle.path())
            .args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
                &url,
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let (answer, code) = text.rsplit_once('\n').unwrap();
        assert_eq!(code, "400", "{body}: {text}");
        assert!(answer.contains(message), "{body}: {answer}");
    }
    assert!(operator.process.is_running());

    // 200 pod creations through the webhook, each injected once. Latency figures are
    // printed for the record (timing is for benchmarks, not for a pass/fail test).
    let mut took = Vec::new();
    for i in 0..200 {
        let p = pod(&format!("load-{i}"), json!({"app": "gateway"}), json!({}));
        let started = Instant::now();
        let created = pods.create(&PostParams::default(), &p).await.unwrap();
        took.push(started.elapsed());
        assert_eq!(sidecars(&created).len(), 1);
    }
    took.sort();
    plane.kubectl(&["create", "namespace", "no-webhook"]);
    let plain_pods: Api<Pod> = Api::namespaced(client.clone(), "no-webhook");
    let mut baseline = Vec::new();
    for i in 0..200 {
        let p = pod(&format!("load-{i}"), json!({"app": "gateway"}), json!({}));
        let started = Instant::now();
        plain_pods.create(&PostParams::default(), &p).await.unwrap();
        baseline.push(started.elapsed());
    }
    baseline.sort();
    let bucket = |le: &str| {
        operator.metric(&format!(
            "virus_scan_operator_admission_duration_seconds_bucket{{le=\"{le}\"}}"
        ))
    };
    let count = operator.metric("virus_scan_operator_admission_duration_seconds_count");
    eprintln!(
        "admission reviews answered within 1/2/5/10 ms: {}/{}/{}/{} of {count}; pod create with the webhook p50 {:?} p99 {:?}, without p50 {:?} p99 {:?}",
        bucket("0.001"),
        bucket("0.002"),
        bucket("0.005"),
        bucket("0.01"),
        percentile(&took, 0.5),
        percentile(&took, 0.99),
        percentile(&baseline, 0.5),
        percentile(&baseline, 0.99)
    );
    assert!(count >= 200.0, "the webhook saw {count} reviews");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_the_webhook_trusted_and_outdated_deployments_restart() {
    // Certificates valid for 40 s and renewed with 32 s left: a rotation every ~8 s.
    let (_plane, client, _operator) = setup(&[
        ("WEBHOOK_CERT_VALIDITY_SECONDS", "40".to_owned()),
        ("WEBHOOK_CERT_RENEW_BEFORE_SECONDS", "32".to_owned()),
        ("WEBHOOK_CERT_CHECK_SECONDS", "1".to_owned()),
    ])
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "default");
    let serving = || async {
        secrets
            .get("virus-scan-operator-webhook-tls")
            .await
            .unwrap()
            .data
            .unwrap()["tls.crt"]
            .0
            .clone()
    };

    // A Deployment, its ReplicaSet and a pod injected from generation 1.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), NS);
    let template = serde_json::to_value(pod("x", json!({"app": "gateway"}), json!({}))).unwrap();
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": { "name": "gw" },
        "spec": {
            "selector": { "matchLabels": { "app": "gateway" } },
            "template": { "metadata": { "labels": { "app": "gateway" } }, "spec": template["spec"] }
        }
    }))
    .unwrap();
    let deployment = deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let replica_sets: Api<ReplicaSet> = Api::namespaced(client.clone(), NS);
    let rs: ReplicaSet = serde_json::from_value(json!({
        "metadata": { "name": "gw-1", "ownerReferences": [{
            "apiVersion": "apps/v1", "kind": "Deployment", "name": "gw",
            "uid": deployment.metadata.uid, "controller": true
        }]},
        "spec": {
            "selector": { "matchLabels": { "app": "gateway" } },
            "template": { "metadata": { "labels": { "app": "gateway" } }, "spec": template["spec"] }
        }
    }))
    .unwrap();
    let rs = replica_sets
        .create(&PostParams::default(), &rs)
        .await
        .unwrap();
    let mut owned = pod("gw-1-abc", json!({"app": "gateway"}), json!({}));
    owned.metadata.owner_references = Some(
        serde_json::from_value(json!([{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "gw-1",
            "uid": rs.metadata.uid, "controller": true
        }]))
        .unwrap(),
    );
    create_injected(&pods, &owned).await;

    // Two rotations; after each, the API server still calls the webhook successfully.
    for round in 0..2 {
        let (cert, bundle) = (serving().await, ca_bundle(&configs).await.unwrap());
        eventually(Duration::from_secs(30), "certificate rotated", || async {
            serving().await != cert && ca_bundle(&configs).await.unwrap() != bundle
        })
        .await;
        let rotated = ca_bundle(&configs).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&rotated)
                .matches("BEGIN CERTIFICATE")
                .count(),
            2,
            "the bundle holds the new and the previous CA"
        );
        let created = create_injected(
            &pods,
            &pod(
                &format!("after-rotation-{round}"),
                json!({"app": "gateway"}),
                json!({}),
            ),
        )
        .await;
        assert_eq!(sidecars(&created).len(), 1);
    }

    // The policy changes and opts in to restarts: the Deployment is restarted once.
    let policies: Api<VirusScanPolicy> = Api::namespaced(client.clone(), NS);
    policies
        .patch(
            "gateway",
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": { "annotations": { "virusscan.aether-platform.io/restart-outdated": "true" } },
                "spec": { "scan": { "timeoutSeconds": 20 } }
            })),
        )
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "Deployment restarted", || async {
        deployments
            .get("gw")
            .await
            .unwrap()
            .spec
            .unwrap()
            .template
            .metadata
            .and_then(|m| m.annotations)
            .is_some_and(|a| {
                a.get("virusscan.aether-platform.io/restarted-for-generation")
                    == Some(&"2".to_owned())
                    && a.contains_key("kubectl.kubernetes.io/restartedAt")
            })
    })
    .await;
    let status = policies.get("gateway").await.unwrap().status.unwrap();
    assert!(status.outdated_pods >= 1, "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_files_as_cert_manager_provides_it() {
    let plane = tenant_plane(&[]).await;
    // cert-manager's part, played by the test: a serving certificate in a mounted directory
    // and the CA injected into the webhook configuration.
    let certs = tempfile::tempdir().unwrap();
    let (crt, key) = plane.issue_server_certificate("webhook");
    std::fs::copy(&crt, certs.path().join("tls.crt")).unwrap();
    std::fs::copy(&key, certs.path().join("tls.key")).unwrap();
    let operator = Operator::start_with(
        &plane,
        "op-files",
        &[
            ("WEBHOOK_CERT_DIR", certs.path().display().to_string()),
            ("WEBHOOK_CERT_CHECK_SECONDS", "1".to_owned()),
        ],
    );
    let ca = std::fs::read(plane.ca_file()).unwrap();
    let mut config: MutatingWebhookConfiguration =
        serde_saphyr::from_str(&webhook_configuration(operator.webhook_port)).unwrap();
    for hook in config.webhooks.iter_mut().flatten() {
        hook.client_config.ca_bundle = Some(k8s_openapi::ByteString(ca.clone()));
    }
    let client = plane.client().await;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    configs
        .create(&PostParams::default(), &config)
        .await
        .unwrap();

    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let created = create_injected(
        &pods,
        &pod("gw-files", json!({"app": "gateway"}), json!({})),
    )
    .await;
    assert_eq!(sidecars(&created).len(), 1);
    // The operator leaves the caBundle and the Secret to cert-manager.
    assert_eq!(ca_bundle(&configs).await, Some(ca));
    let secrets: Api<Secret> = Api::namespaced(client, "default");
    assert!(
        secrets
            .get_opt("virus-scan-operator-webhook-tls")
            .await
            .unwrap()
            .is_none()
    );
}

/// A webhook configuration for `port`, trusted through the plane's test CA.
async fn trust_webhook_at(plane: &ControlPlane, client: &Client, port: u16) {
    let ca = std::fs::read(plane.ca_file()).unwrap();
    let mut config: MutatingWebhookConfiguration =
        serde_saphyr::from_str(&webhook_configuration(port)).unwrap();
    for hook in config.webhooks.iter_mut().flatten() {
        hook.client_config.ca_bundle = Some(k8s_openapi::ByteString(ca.clone()));
    }
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    configs
        .create(&PostParams::default(), &config)
        .await
        .unwrap();
}

fn admissions(injector: &webhook::Injector, result: &'static str) -> u64 {
    injector
        .metrics
        .requests
        .get_or_create(&webhook::ResultLabel { result })
        .get()
}

/// The operator's webhook as it runs in a replica (the same router, TLS listener and
/// policy cache), in this process, so that the test decides when the cache may sync: the
/// watch that fills it starts only when `release` fires, as after a slow start or a restart
/// while the API server is busy.
async fn webhook_with_held_cache(
    plane: &ControlPlane,
    client: &Client,
    certs_dir: &std::path::Path,
) -> (webhook::Injector, u16, tokio::sync::oneshot::Sender<()>) {
    let (crt, key) = plane.issue_server_certificate("webhook");
    std::fs::copy(&crt, certs_dir.join("tls.crt")).unwrap();
    std::fs::copy(&key, certs_dir.join("tls.key")).unwrap();
    let resolver = Arc::new(certs::CertResolver::default());
    tokio::spawn(certs::maintain(
        client.clone(),
        certs::CertSource::Files(certs_dir.to_owned()),
        resolver.clone(),
        Duration::from_secs(1),
    ));
    eventually(Duration::from_secs(10), "certificate loaded", || {
        let loaded = resolver.is_loaded();
        async move { loaded }
    })
    .await;

    let (policies, cache) = webhook::policy_cache(client.clone());
    let (release, held) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if held.await.is_ok() {
            cache.await;
        }
    });
    let injector = webhook::Injector {
        policies,
        defaults: Arc::new(InjectDefaults::plain(
            "virus-scanner:test",
            "redis.virus-scanner.svc",
        )),
        metrics: webhook::WebhookMetrics::register(&mut Default::default()),
        envoy_gateway_namespace: None,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(webhook::serve_tls(
        listener,
        resolver,
        webhook::router(injector.clone()),
        std::future::pending(),
    ));
    (injector, port, release)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_pod_is_admitted_without_its_sidecar_before_the_policy_cache_syncs() {
    let plane = tenant_plane(&["pod-security.kubernetes.io/enforce=restricted"]).await;
    let client = plane.client().await;
    let certs_dir = tempfile::tempdir().unwrap();
    let (injector, port, release) =
        webhook_with_held_cache(&plane, &client, certs_dir.path()).await;
    trust_webhook_at(&plane, &client, port).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);

    // An opted-out pod needs no policy: it is let through, which also shows that the API
    // server now calls the webhook.
    let opted_out = json!({"virusscan.aether-platform.io/inject": "false"});
    let started = Instant::now();
    while admissions(&injector, "skipped") == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the webhook is never called"
        );
        let _ = pods
            .create(
                &PostParams::default(),
                &pod("probe", json!({"app": "gateway"}), opted_out.clone()),
            )
            .await;
        let _ = pods.delete("probe", &Default::default()).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The cache has not synced: the replica is not ready, and no pod gets in, whether a
    // policy would select it or not, as no one can tell yet.
    assert!(!injector.policies_synced());
    for (name, app) in [
        ("gw-0", "gateway"),
        ("gw-1", "gateway"),
        ("billing", "billing"),
    ] {
        let refused = pods
            .create(
                &PostParams::default(),
                &pod(name, json!({"app": app}), json!({})),
            )
            .await
            .expect_err("a pod was admitted before the policies were loaded");
        assert!(
            refused
                .to_string()
                .contains("has not loaded the VirusScanPolicies"),
            "{refused}"
        );
    }
    assert_eq!(admissions(&injector, "not_synced"), 3);
    assert!(!injector.policies_synced());

    // Once the cache syncs, the same pods are admitted with their sidecar.
    release.send(()).unwrap();
    eventually(Duration::from_secs(20), "policy cache synced", || {
        let synced = injector.policies_synced();
        async move { synced }
    })
    .await;
    for name in ["gw-0", "gw-1"] {
        let created = pods
            .create(
                &PostParams::default(),
                &pod(name, json!({"app": "gateway"}), json!({})),
            )
            .await
            .unwrap();
        assert_eq!(sidecars(&created).len(), 1);
    }
    // Every pod that exists, but the opted-out probes, carries the sidecar.
    let all = pods.list(&Default::default()).await.unwrap();
    let mut names = Vec::new();
    for p in all {
        if inject::opted_out(&p) {
            continue;
        }
        assert_eq!(sidecars(&p).len(), 1, "{p:?}");
        names.push(p.metadata.name.clone().unwrap());
    }
    assert_eq!(names, ["gw-0", "gw-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_sidecar_is_injected_over_and_never_counted_as_injected() {
    let plane = tenant_plane(&["pod-security.kubernetes.io/enforce=restricted"]).await;
    let operator = Operator::start(&plane, "op-forged");
    let client = plane.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let policies: Api<VirusScanPolicy> = Api::namespaced(client.clone(), NS);

    // A container named like the sidecar that scans nothing, under the annotations of an
    // injection and a hash made the way the injector makes it.
    let forged = |name: &str| {
        let mut p = pod(name, json!({"app": "gateway"}), json!({}));
        let fake: Container = serde_json::from_value(json!({
            "name": SIDECAR,
            "image": "busybox",
            "command": ["sleep", "infinity"],
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "capabilities": { "drop": ["ALL"] }
            }
        }))
        .unwrap();
        let hash = injection_hash(&fake, false);
        p.spec.as_mut().unwrap().containers.push(fake);
        p.metadata.annotations = Some(
            serde_json::from_value(json!({
                "virusscan.aether-platform.io/policy": "gateway",
                "virusscan.aether-platform.io/policy-generation": "1",
                ANNOTATION_HASH: hash,
            }))
            .unwrap(),
        );
        p
    };

    // Before the webhook is installed, a forged pod gets in as written: the controller
    // counts it as matched and needing a restart, not as injected.
    pods.create(&PostParams::default(), &forged("gw-early"))
        .await
        .unwrap();
    let status = || async {
        policies
            .get("gateway")
            .await
            .unwrap()
            .status
            .map(|s| (s.matched_pods, s.injected_pods, s.outdated_pods))
    };
    eventually(
        Duration::from_secs(30),
        "the forged pod counted",
        || async { status().await == Some((1, 0, 1)) },
    )
    .await;

    // Through the webhook, the forged container is replaced by the real sidecar.
    apply(&plane, &webhook_configuration(operator.webhook_port));
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    eventually(Duration::from_secs(30), "caBundle patched", || async {
        ca_bundle(&configs).await.is_some()
    })
    .await;
    let sent = forged("gw-forged");
    let created = create_injected(&pods, &sent).await;
    let found = sidecars(&created);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_ne!(found[0].image.as_deref(), Some("busybox"));
    assert_eq!(found[0].restart_policy.as_deref(), Some("Always"));
    assert!(
        created
            .spec
            .as_ref()
            .unwrap()
            .containers
            .iter()
            .all(|c| c.name != SIDECAR)
    );
    let recorded = &created.metadata.annotations.as_ref().unwrap()[ANNOTATION_HASH];
    assert_ne!(
        recorded,
        &sent.metadata.annotations.as_ref().unwrap()[ANNOTATION_HASH]
    );

    // The pod as the API server stored it checks: it, and only it, counts as injected.
    eventually(
        Duration::from_secs(30),
        "the injected pod counted",
        || async { status().await == Some((2, 1, 1)) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_that_cannot_load_the_policies_yet_is_not_ready_and_admits_no_pod() {
    let plane = tenant_plane(&["pod-security.kubernetes.io/enforce=restricted"]).await;
    // The operator acts as a user that may do everything it needs but read the policies,
    // until the test grants that: its policy cache cannot sync before.
    apply(
        &plane,
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: { name: vs-operator-base }
roleRef: { apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: vs-operator-base }
subjects: [{ apiGroup: rbac.authorization.k8s.io, kind: User, name: vs-operator }]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: { name: vs-operator-base }
rules:
- apiGroups: ["", apps, coordination.k8s.io, admissionregistration.k8s.io, events.k8s.io]
  resources: ["*"]
  verbs: ["*"]
"#,
    );
    let kubeconfig = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    let admin = std::fs::read_to_string(plane.kubeconfig()).unwrap();
    let limited = admin.replacen("  user:\n", "  user:\n    as: vs-operator\n", 1);
    assert_ne!(limited, admin);
    std::fs::write(kubeconfig.path(), limited).unwrap();
    let operator = Operator::start_with(
        &plane,
        "op-limited",
        &[("KUBECONFIG", kubeconfig.path().display().to_string())],
    );
    apply(&plane, &webhook_configuration(operator.webhook_port));
    let client = plane.client().await;
    let configs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    eventually(Duration::from_secs(30), "caBundle patched", || async {
        ca_bundle(&configs).await.is_some()
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let ready = || http_get(operator.ops_port, "/ready").map(|(status, _)| status);

    // Opted-out pods need no policy and get in: the API server calls the webhook by now.
    let skipped = "virus_scan_operator_admission_requests_total{result=\"skipped\"}";
    let opted_out = json!({"virusscan.aether-platform.io/inject": "false"});
    let mut probes = 0;
    while operator.metric(skipped) == 0.0 {
        assert!(probes < 100, "the webhook is never called");
        probes += 1;
        let _ = pods
            .create(
                &PostParams::default(),
                &pod(
                    &format!("probe-{probes}"),
                    json!({"app": "gateway"}),
                    opted_out.clone(),
                ),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The certificate is served, but without the policies the replica is not ready and
    // refuses every pod.
    assert_ne!(ready(), Some(200));
    for name in ["gw-0", "gw-1"] {
        let refused = pods
            .create(
                &PostParams::default(),
                &pod(name, json!({"app": "gateway"}), json!({})),
            )
            .await
            .expect_err("a pod was admitted before the policies were loaded");
        assert!(
            refused
                .to_string()
                .contains("has not loaded the VirusScanPolicies"),
            "{refused}"
        );
    }
    assert_ne!(ready(), Some(200));

    // Allowed to read the policies, it syncs, becomes ready and injects.
    apply(
        &plane,
        r#"apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: { name: vs-operator-policies }
roleRef: { apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: vs-operator-policies }
subjects: [{ apiGroup: rbac.authorization.k8s.io, kind: User, name: vs-operator }]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: { name: vs-operator-policies }
rules:
- apiGroups: [virusscan.aether-platform.io]
  resources: ["*"]
  verbs: ["*"]
"#,
    );
    eventually(Duration::from_secs(60), "the operator ready", || {
        let status = ready();
        async move { status == Some(200) }
    })
    .await;
    for name in ["gw-0", "gw-1"] {
        let created =
            create_injected(&pods, &pod(name, json!({"app": "gateway"}), json!({}))).await;
        assert_eq!(sidecars(&created).len(), 1);
    }
    for p in pods.list(&Default::default()).await.unwrap() {
        assert!(
            inject::opted_out(&p) || sidecars(&p).len() == 1,
            "admitted without its sidecar: {p:?}"
        );
    }
}
