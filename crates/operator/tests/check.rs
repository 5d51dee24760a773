//! `virus-scan-operator check` against a real kube-apiserver: a protected pod, and each reason
//! a pod is not.
#![allow(clippy::unwrap_used)]

mod support;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use support::{EXAMPLES, plane_with_crd};
use virus_scan_operator::check::{CheckArgs, check};
use virus_scan_operator::crd::VirusScanPolicy;
use virus_scan_operator::inject::{InjectDefaults, inject};

fn args(namespace: &str, target: &str) -> CheckArgs {
    CheckArgs {
        namespace: namespace.into(),
        target: target.into(),
        namespace_label: "virusscan.aether-platform.io/injection".into(),
        envoy_gateway_namespace: "envoy-gateway-system".into(),
    }
}

fn pod(name: &str, labels: serde_json::Value, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": { "name": name, "labels": labels, "annotations": annotations },
        "spec": { "containers": [{ "name": "envoy", "image": "envoyproxy/envoy:v1.40.0" }] }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_says_why_a_pod_is_or_is_not_protected() {
    let plane = tokio::task::spawn_blocking(plane_with_crd).await.unwrap();
    plane.kubectl(&["create", "namespace", "tenant-a"]);
    plane.kubectl(&["create", "namespace", "tenant-b"]);
    plane.kubectl(&[
        "label",
        "namespace",
        "tenant-a",
        "virusscan.aether-platform.io/injection=enabled",
    ]);
    let policy_file = format!("{EXAMPLES}/virusscanpolicy.yaml");
    plane.kubectl(&["apply", "-f", &policy_file]);
    let client = plane.client().await;
    let policies: Api<VirusScanPolicy> = Api::namespaced(client.clone(), "tenant-a");
    let policy = policies.get("gateway").await.unwrap();
    let defaults = InjectDefaults::plain("virus-scanner:test", "redis");
    let pods_a: Api<Pod> = Api::namespaced(client.clone(), "tenant-a");
    let gateway = json!({"app": "gateway"});
    pods_a
        .create(
            &PostParams::default(),
            &inject(
                &pod("injected", gateway.clone(), json!({})),
                &policy,
                &defaults,
            ),
        )
        .await
        .unwrap();
    for (name, labels, annotations) in [
        ("bare", gateway.clone(), json!({})),
        ("other", json!({"app": "web"}), json!({})),
        (
            "opted-out",
            gateway.clone(),
            json!({"virusscan.aether-platform.io/inject": "false"}),
        ),
    ] {
        pods_a
            .create(&PostParams::default(), &pod(name, labels, annotations))
            .await
            .unwrap();
    }
    Api::<Pod>::namespaced(client.clone(), "tenant-b")
        .create(
            &PostParams::default(),
            &pod("elsewhere", gateway.clone(), json!({})),
        )
        .await
        .unwrap();

    let failing = |report: &virus_scan_operator::check::Report| -> Vec<String> {
        report
            .findings
            .iter()
            .filter(|f| !f.ok)
            .map(|f| f.text.clone())
            .collect()
    };
    // Without the operator the policy has no Ready condition: not protected, and why.
    let r = check(&client, &args("tenant-a", "injected")).await.unwrap();
    assert!(!r.protected);
    assert_eq!(failing(&r).len(), 1, "{r}");
    assert!(failing(&r)[0].contains("no Ready condition"), "{r}");

    // Ready, as the controller would report it.
    plane.kubectl(&[
        "patch",
        "-n",
        "tenant-a",
        "virusscanpolicy",
        "gateway",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"conditions":[{"type":"Ready","status":"True","reason":"Configured","message":"ok","lastTransitionTime":"2026-11-30T00:00:00Z"}]}}"#,
    ]);
    let r = check(&client, &args("tenant-a", "injected")).await.unwrap();
    assert!(r.protected, "{r}");
    assert!(r.to_string().ends_with("protected\n"), "{r}");

    for (ns, pod, why) in [
        ("tenant-a", "bare", "no sidecar"),
        ("tenant-a", "other", "no VirusScanPolicy"),
        ("tenant-a", "opted-out", "opts out"),
        ("tenant-b", "elsewhere", "has not opted in"),
    ] {
        let r = check(&client, &args(ns, pod)).await.unwrap();
        assert!(!r.protected, "{ns}/{pod}: {r}");
        assert!(
            failing(&r).iter().any(|f| f.contains(why)),
            "{ns}/{pod} should say {why:?}:\n{r}"
        );
    }

    // An edit of the policy makes the injected sidecar outdated.
    plane.kubectl(&[
        "patch",
        "-n",
        "tenant-a",
        "virusscanpolicy",
        "gateway",
        "--type=merge",
        "-p",
        r#"{"spec":{"scan":{"timeoutSeconds":31}}}"#,
    ]);
    let r = check(&client, &args("tenant-a", "injected")).await.unwrap();
    assert!(!r.protected, "{r}");
    assert!(
        failing(&r).iter().any(|f| f.contains("outdated sidecar")),
        "{r}"
    );
}
