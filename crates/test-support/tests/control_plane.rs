//! The Kubernetes tier's own proof: a real etcd and kube-apiserver, CRDs and custom objects
//! through kube::Client, kubectl and helm from the cache, and a mutating webhook served by
//! the test over HTTPS that the API server calls on Pod CREATE.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use virus_scanner_test_support::kube::ControlPlane;

const CRD: &str = r#"apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.test.virus-scanner.dev
spec:
  group: test.virus-scanner.dev
  names: { kind: Widget, plural: widgets, singular: widget }
  scope: Namespaced
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            properties:
              size: { type: integer, minimum: 1 }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crd_objects_kubectl_helm_and_a_mutating_webhook_on_a_real_apiserver() {
    let (plane, took) = tokio::task::spawn_blocking(ControlPlane::timed_start)
        .await
        .unwrap();
    eprintln!("control plane ready in {took:?}");

    // kubectl and helm from the cache talk to it.
    let version = plane.kubectl(&["version", "-o", "json"]);
    assert!(version.contains("serverVersion"), "{version}");
    let helm = plane.command("helm").args(["list", "-A"]).output().unwrap();
    assert!(
        helm.status.success(),
        "{}",
        String::from_utf8_lossy(&helm.stderr)
    );

    // A CRD, then a custom object created, listed and deleted through kube::Client.
    let crd_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(crd_file.path(), CRD).unwrap();
    plane.kubectl(&["apply", "-f", &crd_file.path().display().to_string()]);
    plane.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/widgets.test.virus-scanner.dev",
    ]);
    let client = plane.client().await;
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(
        "test.virus-scanner.dev",
        "v1",
        "Widget",
    ));
    let widgets: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &resource);
    let widget: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "test.virus-scanner.dev/v1",
        "kind": "Widget",
        "metadata": { "name": "w1" },
        "spec": { "size": 3 }
    }))
    .unwrap();
    widgets
        .create(&PostParams::default(), &widget)
        .await
        .unwrap();
    let listed = widgets.list(&ListParams::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(listed.items[0].data["spec"]["size"], 3);
    // The schema is enforced by the API server.
    let bad: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "test.virus-scanner.dev/v1", "kind": "Widget",
        "metadata": { "name": "w2" }, "spec": { "size": 0 }
    }))
    .unwrap();
    let err = widgets
        .create(&PostParams::default(), &bad)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.size"), "{err}");
    widgets.delete("w1", &Default::default()).await.unwrap();
    assert!(
        widgets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );

    // A mutating webhook served by this test, trusted through its caBundle.
    let calls = Arc::new(AtomicUsize::new(0));
    let port = serve_webhook(&plane, calls.clone()).await;
    let ca_bundle = base64(&std::fs::read(plane.ca_file()).unwrap());
    let webhook = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: MutatingWebhookConfiguration
metadata: {{ name: test-webhook }}
webhooks:
- name: label.test.virus-scanner.dev
  admissionReviewVersions: ["v1"]
  sideEffects: None
  failurePolicy: Fail
  timeoutSeconds: 5
  namespaceSelector: {{ matchLabels: {{ webhook-test: "on" }} }}
  clientConfig:
    url: https://127.0.0.1:{port}/mutate
    caBundle: {ca_bundle}
  rules:
  - operations: ["CREATE"]
    apiGroups: [""]
    apiVersions: ["v1"]
    resources: ["pods"]
"#
    );
    let webhook_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(webhook_file.path(), webhook).unwrap();
    plane.kubectl(&["apply", "-f", &webhook_file.path().display().to_string()]);
    plane.kubectl(&["create", "namespace", "hooked"]);
    plane.kubectl(&["label", "namespace", "hooked", "webhook-test=on"]);
    plane.kubectl(&["create", "namespace", "plain"]);

    let pod = |ns: &str| -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": { "name": "p", "namespace": ns },
            "spec": { "containers": [{ "name": "c", "image": "busybox" }] }
        }))
        .unwrap()
    };
    // The webhook configuration takes a moment to reach the API server's admission chain.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "hooked");
    let started = Instant::now();
    let created = loop {
        let created = pods
            .create(&PostParams::default(), &pod("hooked"))
            .await
            .unwrap();
        if created
            .metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key("mutated-by"))
        {
            break created;
        }
        pods.delete("p", &Default::default()).await.unwrap();
        wait_gone(&pods).await;
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the webhook was never called"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(
        created.metadata.labels.unwrap()["mutated-by"],
        "test-webhook"
    );
    assert!(calls.load(Ordering::SeqCst) >= 1);
    // Pods stay Pending without a scheduler; admission still ran.
    assert_eq!(
        created.status.and_then(|s| s.phase).as_deref(),
        Some("Pending")
    );

    // Outside the selected namespace the webhook is not called.
    let before = calls.load(Ordering::SeqCst);
    let plain: Api<Pod> = Api::namespaced(client, "plain");
    let untouched = plain
        .create(&PostParams::default(), &pod("plain"))
        .await
        .unwrap();
    assert!(untouched.metadata.labels.is_none());
    assert_eq!(calls.load(Ordering::SeqCst), before);
}

async fn wait_gone(pods: &Api<Pod>) {
    for _ in 0..50 {
        if pods.get_opt("p").await.unwrap().is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Serves `/mutate` over HTTPS with a certificate from the cluster's test CA; the patch adds
/// a label to every pod.
async fn serve_webhook(plane: &ControlPlane, calls: Arc<AtomicUsize>) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let (crt, key) = plane.issue_server_certificate("webhook");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&crt)
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(&key).unwrap();
    let tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = Router::new().route(
        "/mutate",
        post(move |body: axum::body::Bytes| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let patch = serde_json::json!([{
                    "op": "add",
                    "path": "/metadata/labels",
                    "value": { "mutated-by": "test-webhook" }
                }]);
                let answer = serde_json::json!({
                    "apiVersion": "admission.k8s.io/v1",
                    "kind": "AdmissionReview",
                    "response": {
                        "uid": review["request"]["uid"],
                        "allowed": true,
                        "patchType": "JSONPatch",
                        "patch": base64(patch.to_string().as_bytes()),
                    }
                });
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    answer.to_string(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
            });
        }
    });
    port
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}
