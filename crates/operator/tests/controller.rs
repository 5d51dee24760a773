//! The controller against a real kube-apiserver: policies become Envoy configuration that a
//! real `envoy --mode validate` accepts, invalid policies are refused by the API server,
//! generated objects are kept in step, and of two replicas only the leader writes.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use support::{EXAMPLES, Operator, envoy_validates, eventually, plane_with_crd};
use virus_scan_operator::crd::VirusScanPolicy;
use virus_scan_operator::envoy::EXT_PROC_FILTER;
use virus_scan_operator::inject::{InjectDefaults, inject};

const NS: &str = "tenant-a";

async fn start_plane() -> virus_scanner_test_support::kube::ControlPlane {
    let plane = tokio::task::spawn_blocking(plane_with_crd).await.unwrap();
    plane.kubectl(&["create", "namespace", NS]);
    plane
}

async fn create_pod(client: &Client, name: &str, labels: Value, annotations: Value) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels, "annotations": annotations },
        "spec": { "containers": [{ "name": "envoy", "image": "envoyproxy/envoy:v1.40.0" }] }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
}

/// What the operator fills in where a policy is silent, in these tests.
const PRODUCER_IMAGE: &str = "virus-scanner:test";
const REDIS_HOST: &str = "redis.virus-scanner.svc";

fn operator_defaults() -> [(&'static str, String); 2] {
    [
        ("PRODUCER_IMAGE", PRODUCER_IMAGE.to_owned()),
        ("DEFAULT_REDIS_HOST", REDIS_HOST.to_owned()),
    ]
}

/// A gateway pod as the injector leaves it when the example policy (generation 1) selects it.
async fn create_injected_pod(client: &Client, name: &str) {
    let text = std::fs::read_to_string(format!("{EXAMPLES}/virusscanpolicy.yaml")).unwrap();
    let mut policy: VirusScanPolicy = serde_saphyr::from_str(&text).unwrap();
    policy.metadata.namespace = Some(NS.to_owned());
    policy.metadata.generation = Some(1);
    let defaults = InjectDefaults::plain(PRODUCER_IMAGE, REDIS_HOST);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": { "name": name, "labels": {"app": "gateway"} },
        "spec": { "containers": [{ "name": "envoy", "image": "envoyproxy/envoy:v1.40.0" }] }
    }))
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    pods.create(&PostParams::default(), &inject(&pod, &policy, &defaults))
        .await
        .unwrap();
}

async fn ready_policy(api: &Api<VirusScanPolicy>, name: &str) -> Option<VirusScanPolicy> {
    let policy = api.get_opt(name).await.ok()??;
    let status = policy.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    (ready && status.observed_generation == policy.metadata.generation).then_some(policy)
}

async fn wait_ready(api: &Api<VirusScanPolicy>, name: &str) -> VirusScanPolicy {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(policy) = ready_policy(api, name).await {
            return policy;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "policy {name} not Ready: {:?}",
            api.get_opt(name)
                .await
                .ok()
                .flatten()
                .and_then(|p| p.status)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn data(cm: &ConfigMap, key: &str) -> String {
    cm.data.as_ref().unwrap()[key].clone()
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_becomes_envoy_config_that_is_kept_in_step() {
    let plane = start_plane().await;
    let client = plane.client().await;
    create_injected_pod(&client, "gw-injected").await;
    // Annotations claiming an injection, without the sidecar: matched, not injected.
    create_pod(
        &client,
        "gw-claimed",
        json!({"app": "gateway"}),
        json!({
            "virusscan.aether-platform.io/policy": "gateway",
            "virusscan.aether-platform.io/policy-generation": "1"
        }),
    )
    .await;
    create_pod(&client, "gw-plain", json!({"app": "gateway"}), json!({})).await;
    create_pod(&client, "other", json!({"app": "billing"}), json!({})).await;

    let operator = Operator::start_with(&plane, "op-0", &operator_defaults());
    plane.kubectl(&["apply", "-f", &format!("{EXAMPLES}/virusscanpolicy.yaml")]);

    let policies: Api<VirusScanPolicy> = Api::namespaced(client.clone(), NS);
    let policy = wait_ready(&policies, "gateway").await;
    let status = policy.status.clone().unwrap();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(
        (
            status.matched_pods,
            status.injected_pods,
            status.outdated_pods
        ),
        (3, 1, 1)
    );
    assert_eq!(status.config_map_ref.as_deref(), Some("vsp-gateway-envoy"));
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "ConfigGenerated"
                && c.status == "True"
                && c.observed_generation == Some(1))
    );

    // The ConfigMap: owned by the policy, its example bootstrap accepted by Envoy.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let cm = config_maps.get("vsp-gateway-envoy").await.unwrap();
    let owner = &cm.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("VirusScanPolicy", "gateway")
    );
    assert_eq!(Some(&owner.uid), policy.metadata.uid.as_ref());
    assert_eq!(owner.controller, Some(true));
    envoy_validates(&data(&cm, "bootstrap.yaml"));
    let filter = yaml(&data(&cm, "ext-proc-filter.yaml"));
    assert_eq!(filter["typed_config"]["failure_mode_allow"], json!(false));
    assert_eq!(filter["typed_config"]["message_timeout"], "35s");
    let routes = yaml(&data(&cm, "route-overrides.yaml"));
    assert_eq!(routes["health"]["match"]["path"], "/healthz");
    assert_eq!(
        routes["static-assets"]["typed_per_filter_config"][EXT_PROC_FILTER]["disabled"],
        true
    );

    // `kubectl get vsp` shows the printer columns; `-o wide` adds the failure mode and the
    // outdated pods.
    let table = plane.kubectl(&["get", "vsp", "-n", NS]);
    for column in [
        "GATEWAY",
        "PROTECTED",
        "MODE",
        "MATCHED",
        "INJECTED",
        "READY",
    ] {
        assert!(table.contains(column), "{column}: {table}");
    }
    assert!(
        table.contains("Envoy") && table.contains("Buffered") && !table.contains("FailClosed"),
        "{table}"
    );
    let wide = plane.kubectl(&["get", "vsp", "-n", NS, "-o", "wide"]);
    assert!(
        wide.contains("FAILURE") && wide.contains("OUTDATED") && wide.contains("FailClosed"),
        "{wide}"
    );

    // Editing the policy updates the ConfigMap; the annotated pod is now outdated.
    policies
        .patch(
            "gateway",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"scan": {"timeoutSeconds": 12}}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "ConfigMap follows the edit",
        || async {
            let cm = config_maps.get("vsp-gateway-envoy").await.unwrap();
            yaml(&data(&cm, "ext-proc-filter.yaml"))["typed_config"]["message_timeout"] == "17s"
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "status of generation 2",
        || async {
            ready_policy(&policies, "gateway").await.is_some_and(|p| {
                let s = p.status.unwrap();
                // The injected pod's sidecar is of generation 1, the claimed one is none.
                s.observed_generation == Some(2) && s.outdated_pods == 2
            })
        },
    )
    .await;
    let generated = config_maps.get("vsp-gateway-envoy").await.unwrap().data;

    // A deleted ConfigMap comes back; a hand-edited one is put back.
    config_maps
        .delete("vsp-gateway-envoy", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "deleted ConfigMap restored",
        || async {
            config_maps
                .get_opt("vsp-gateway-envoy")
                .await
                .unwrap()
                .is_some_and(|cm| cm.data == generated)
        },
    )
    .await;
    config_maps
        .patch(
            "vsp-gateway-envoy",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"ext-proc-filter.yaml": "tampered: true\n"}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "edited ConfigMap restored",
        || async { config_maps.get("vsp-gateway-envoy").await.unwrap().data == generated },
    )
    .await;

    // Events tell the story.
    let events = plane.kubectl(&["get", "events", "-n", NS, "-o", "json"]);
    assert!(events.contains("ConfigGenerated"), "{events}");
    assert!(operator.metric("virus_scan_operator_reconciles_total") >= 3.0);
    assert!(operator.metric("virus_scan_operator_reconcile_duration_seconds_count") >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_policies_are_refused_by_the_api_server() {
    let plane = start_plane().await;
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "duplicate-routes",
            r#"routes: [{name: a, path: /x}, {name: a, path: /y}]"#,
            "route names must be unique",
        ),
        (
            "two-match-types",
            r#"routes: [{name: a, path: /x, pathPrefix: /y}]"#,
            "exactly one of pathPrefix, path and regex",
        ),
        (
            "no-match-type",
            r#"routes: [{name: a}]"#,
            "exactly one of pathPrefix, path and regex",
        ),
        (
            "status-700",
            r#"scan: {infectedStatusCode: 700}"#,
            "infectedStatusCode must be an HTTP error status (400-599)",
        ),
        (
            "full-duplex-fail-open",
            r#"scan: {mode: FullDuplexStreamed, failureMode: FailOpen}"#,
            "mode FullDuplexStreamed requires failureMode FailClosed",
        ),
        (
            "negative-size",
            r#"scan: {maxBodyMB: -5}"#,
            "spec.scan.maxBodyMB: Invalid value: -5",
        ),
        (
            "zero-threshold",
            r#"scan: {fileThresholdMB: 0}"#,
            "spec.scan.fileThresholdMB: Invalid value: 0",
        ),
        (
            "threshold-above-maximum",
            r#"scan: {maxBodyMB: 5, fileThresholdMB: 10}"#,
            "fileThresholdMB must not exceed maxBodyMB",
        ),
        (
            "unknown-mode",
            r#"scan: {mode: Streamed}"#,
            "Unsupported value: \"Streamed\"",
        ),
        (
            "unknown-range-requests",
            r#"scan: {rangeRequests: Partial}"#,
            "Unsupported value: \"Partial\"",
        ),
    ];
    for (name, spec, message) in cases {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: virusscan.aether-platform.io/v1alpha1\nkind: VirusScanPolicy\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: gw}}}}\n  {spec}\n"
            ),
        )
        .unwrap();
        let out = plane
            .command("kubectl")
            .args(["apply", "-f"])
            .arg(&file)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(
            stderr.contains(message),
            "{name}: expected {message:?} in\n{stderr}"
        );
    }
    // The example is accepted, and `kubectl explain` documents the fields.
    plane.kubectl(&["apply", "-f", &format!("{EXAMPLES}/virusscanpolicy.yaml")]);
    let mut explained = String::new();
    eventually(Duration::from_secs(30), "kubectl explain", || {
        let out = plane
            .command("kubectl")
            .args(["explain", "virusscanpolicy.spec.scan"])
            .output()
            .unwrap();
        explained = String::from_utf8_lossy(&out.stdout).into_owned();
        async move { out.status.success() }
    })
    .await;
    assert!(explained.contains("failureMode"), "{explained}");
    assert!(explained.contains("FailClosed (default)"), "{explained}");
    assert!(explained.contains("rangeRequests"), "{explained}");
    assert!(explained.contains("embeddedFiles"), "{explained}");
    let shared = plane.kubectl(&["explain", "virusscanpolicy.spec.sharedVolume"]);
    assert!(shared.contains("Redis"), "{shared}");
}

const TENANT_BOOTSTRAP: &str = include_str!("../../../testdata/envoy/tenant-bootstrap.yaml");

const MERGE_POLICY: &str = r#"apiVersion: virusscan.aether-platform.io/v1alpha1
kind: VirusScanPolicy
metadata: { name: merged, namespace: tenant-a }
spec:
  selector: { matchLabels: { app: gateway } }
  routes:
  - { name: health, path: /nothing-by-this-path }
  - { name: static, pathPrefix: /static/ }
  envoy:
    bootstrap: { name: gateway-envoy, key: envoy.yaml }
"#;

/// Listener → the HCM's http filter names and its routes.
fn listeners(bootstrap: &Value) -> Vec<(Vec<String>, Vec<Value>)> {
    bootstrap["static_resources"]["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let hcm = &l["filter_chains"][0]["filters"][0]["typed_config"];
            let filters = hcm["http_filters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|f| f["name"].as_str().unwrap().to_owned())
                .collect();
            let routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
                .as_array()
                .unwrap()
                .clone();
            (filters, routes)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_bootstrap_is_merged_into_a_derived_bootstrap_that_envoy_validates() {
    let plane = start_plane().await;
    let client = plane.client().await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    let tenant: ConfigMap = serde_json::from_value(json!({
        "metadata": { "name": "gateway-envoy" },
        "data": { "envoy.yaml": TENANT_BOOTSTRAP }
    }))
    .unwrap();
    let tenant = config_maps
        .create(&PostParams::default(), &tenant)
        .await
        .unwrap();
    envoy_validates(TENANT_BOOTSTRAP);

    let _operator = Operator::start(&plane, "op-0");
    let dir = tempfile::tempdir().unwrap();
    let policy_file = dir.path().join("policy.yaml");
    std::fs::write(&policy_file, MERGE_POLICY).unwrap();
    plane.kubectl(&["apply", "-f", &policy_file.display().to_string()]);

    let policies: Api<VirusScanPolicy> = Api::namespaced(client.clone(), NS);
    let policy = wait_ready(&policies, "merged").await;
    let status = policy.status.unwrap();
    let derived_ref = status.derived_bootstrap_ref.unwrap();
    assert_eq!(
        (derived_ref.name.as_str(), derived_ref.key.as_str()),
        ("vsp-merged-bootstrap", "envoy.yaml")
    );

    let derived = config_maps.get("vsp-merged-bootstrap").await.unwrap();
    let text = data(&derived, "envoy.yaml");
    envoy_validates(&text);
    let merged = yaml(&text);
    let original = yaml(TENANT_BOOTSTRAP);

    // Every listener is filtered, the filter right before the router.
    let got = listeners(&merged);
    let want = listeners(&original);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].0, [EXT_PROC_FILTER, "envoy.filters.http.router"]);
    assert_eq!(
        got[1].0,
        [
            "envoy.filters.http.cors",
            EXT_PROC_FILTER,
            "envoy.filters.http.router"
        ]
    );
    // Every tenant route is kept; exactly the opted-out ones are disabled.
    let mut disabled = Vec::new();
    for ((_, routes), (_, tenant_routes)) in got.iter().zip(&want) {
        assert_eq!(routes.len(), tenant_routes.len());
        for (route, tenant_route) in routes.iter().zip(tenant_routes) {
            assert_eq!(route["match"], tenant_route["match"]);
            let off = &route["typed_per_filter_config"][EXT_PROC_FILTER];
            if off["disabled"] == true {
                disabled.push(route["match"].clone());
            } else {
                assert!(off.is_null(), "{route}");
            }
        }
    }
    assert_eq!(
        disabled,
        [json!({"path": "/healthz"}), json!({"prefix": "/static/"})]
    );
    // Every connection manager routes on the normalised path.
    for listener in merged["static_resources"]["listeners"].as_array().unwrap() {
        let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(hcm["normalize_path"], true);
        assert_eq!(hcm["merge_slashes"], true);
        assert_eq!(
            hcm["path_with_escaped_slashes_action"],
            "UNESCAPE_AND_REDIRECT"
        );
    }
    let clusters: Vec<&str> = merged["static_resources"]["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(clusters, ["app", "api", "virus_scanner_producer"]);

    // The tenant's ConfigMap is untouched.
    let after = config_maps.get("gateway-envoy").await.unwrap();
    assert_eq!(
        after.metadata.resource_version,
        tenant.metadata.resource_version
    );

    // The offline renderer gives the same derived bootstrap.
    let tenant_file = dir.path().join("envoy.yaml");
    std::fs::write(&tenant_file, TENANT_BOOTSTRAP).unwrap();
    let out = std::process::Command::new(support::operator_binary())
        .args(["envoy-config", "-f"])
        .arg(&policy_file)
        .arg("--bootstrap")
        .arg(&tenant_file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(yaml(&String::from_utf8_lossy(&out.stdout)), merged);

    // A tenant bootstrap that cannot be merged is reported, not half-applied.
    config_maps
        .patch(
            "gateway-envoy",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"envoy.yaml": "admin: {}\n"}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "BootstrapInvalid condition",
        || async {
            policies
                .get("merged")
                .await
                .unwrap()
                .status
                .is_some_and(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == "Ready" && c.status == "False" && c.reason == "BootstrapInvalid"
                    })
                })
        },
    )
    .await;
    // So is one that tells Envoy to route on the path as the client wrote it.
    let unnormalised = TENANT_BOOTSTRAP.replacen(
        "          stat_prefix: public\n",
        "          stat_prefix: public\n          normalize_path: false\n",
        1,
    );
    assert_ne!(unnormalised, TENANT_BOOTSTRAP);
    config_maps
        .patch(
            "gateway-envoy",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"envoy.yaml": unnormalised}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "BootstrapInvalid naming normalize_path",
        || async {
            policies
                .get("merged")
                .await
                .unwrap()
                .status
                .is_some_and(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == "Ready"
                            && c.status == "False"
                            && c.reason == "BootstrapInvalid"
                            && c.message.contains("normalize_path: false")
                    })
                })
        },
    )
    .await;
    assert_eq!(
        data(
            &config_maps.get("vsp-merged-bootstrap").await.unwrap(),
            "envoy.yaml"
        ),
        text,
        "the derived bootstrap was rewritten from a refused tenant bootstrap"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_two_replicas_only_the_leader_writes() {
    let plane = start_plane().await;
    let client = plane.client().await;
    let first = Operator::start(&plane, "op-a");
    eventually(Duration::from_secs(20), "op-a leads", || async {
        first.is_leader()
    })
    .await;
    let mut first = first;
    let second = Operator::start(&plane, "op-b");

    plane.kubectl(&["apply", "-f", &format!("{EXAMPLES}/virusscanpolicy.yaml")]);
    let policies: Api<VirusScanPolicy> = Api::namespaced(client.clone(), NS);
    eventually(Duration::from_secs(30), "policy Ready", || async {
        ready_policy(&policies, "gateway").await.is_some()
    })
    .await;
    // Give the follower every chance to act wrongly.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(first.writes() >= 2.0, "leader wrote {}", first.writes());
    assert!(!second.is_leader());
    assert_eq!(second.writes(), 0.0);
    assert_eq!(second.metric("virus_scan_operator_reconciles_total"), 0.0);
    let holder = plane.kubectl(&[
        "get",
        "lease",
        "virus-scan-operator",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, "op-a");

    // The leader dies without releasing the lease: the follower takes over when it expires
    // and repairs what changed meanwhile.
    first.process.kill9();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    config_maps
        .delete("vsp-gateway-envoy", &DeleteParams::default())
        .await
        .unwrap();
    eventually(Duration::from_secs(30), "op-b leads", || async {
        second.is_leader()
    })
    .await;
    eventually(
        Duration::from_secs(30),
        "ConfigMap restored by op-b",
        || async {
            config_maps
                .get_opt("vsp-gateway-envoy")
                .await
                .unwrap()
                .is_some()
        },
    )
    .await;
    assert!(second.writes() >= 1.0);
    let holder = plane.kubectl(&[
        "get",
        "lease",
        "virus-scan-operator",
        "-n",
        "default",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    assert_eq!(holder, "op-b");
}
