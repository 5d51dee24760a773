//! Reconcile scenarios against a mocked API server: each records every request the
//! reconciler makes and answers it as the API server would, then asserts the exact list.

use std::sync::Arc;

use axum::http::{Method, Request, Response};
use kube::client::Body;
use kube::runtime::controller::Action;
use kube::{Client, Resource};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower_test::mock;

use super::{
    Context, RESYNC, RETRY_ERROR, RETRY_MISSING_BOOTSTRAP, error_policy, reconcile_policy,
};
use crate::crd::VirusScanPolicy;
use crate::envoy;
use crate::inject::{InjectDefaults, inject};
use crate::metrics::{KindLabel, Metrics, ReasonLabel};

const POLICY_UID: &str = "0b5f6c5e-8f7a-4bd4-9d1c-5e8a1f0c2a11";
const CM_PATH: &str = "/api/v1/namespaces/tenant/configmaps";
const STATUS_PATH: &str =
    "/apis/virusscan.aether-platform.io/v1alpha1/namespaces/tenant/virusscanpolicies/gw/status";
const APPLY_QUERY: &str = "?&force=true&fieldManager=virus-scan-operator";

/// One request as the API server saw it.
#[derive(Debug)]
struct Seen {
    method: Method,
    uri: String,
    body: Value,
}

impl Seen {
    fn is(&self, method: Method, uri: &str) -> bool {
        self.method == method && self.uri == uri
    }
}

/// Answers every request with `answer(method, uri, body)` until the client is dropped,
/// then hands back what it saw.
fn api_server(
    mut handle: mock::Handle<Request<Body>, Response<Body>>,
    answer: impl Fn(&Method, &str, &Value) -> (u16, Value) + Send + 'static,
) -> JoinHandle<Vec<Seen>> {
    tokio::spawn(async move {
        let mut seen = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.expect("request body");
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("JSON request body")
            };
            let uri = parts.uri.to_string();
            let (code, reply) = answer(&parts.method, &uri, &body);
            let response = Response::builder()
                .status(code)
                .body(Body::from(serde_json::to_vec(&reply).expect("reply")))
                .expect("response");
            send.send_response(response);
            seen.push(Seen {
                method: parts.method,
                uri,
                body,
            });
        }
        seen
    })
}

fn context() -> (Arc<Context>, mock::Handle<Request<Body>, Response<Body>>) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let metrics = Metrics::register(&mut Registry::default());
    (
        Arc::new(Context::new(client, "test", metrics, Arc::new(defaults()))),
        handle,
    )
}

fn defaults() -> InjectDefaults {
    InjectDefaults::plain("producer:1", "redis")
}

fn policy(spec: Value) -> VirusScanPolicy {
    serde_json::from_value(json!({
        "apiVersion": "virusscan.aether-platform.io/v1alpha1",
        "kind": "VirusScanPolicy",
        "metadata": {"name": "gw", "namespace": "tenant", "uid": POLICY_UID, "generation": 1},
        "spec": spec,
    }))
    .expect("policy")
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

/// What the API server answers to a write: the object written, or for a status patch
/// (which carries only the status) the stored policy with that status.
fn echo(stored: &Value, body: &Value) -> Value {
    if body.get("metadata").is_some() {
        return body.clone();
    }
    let mut policy = stored.clone();
    policy["status"] = body["status"].clone();
    policy
}

fn pod_list(items: Value) -> Value {
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
}

/// The generated ConfigMap as the operator last wrote it.
fn current_config_map(policy: &VirusScanPolicy) -> Value {
    let owner = policy.controller_owner_ref(&()).expect("owner");
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {
            "name": "vsp-gw-envoy", "namespace": "tenant",
            "labels": {"app.kubernetes.io/managed-by": "virus-scan-operator"},
            "ownerReferences": [owner],
        },
        "data": envoy::config_map_data(&policy.spec).expect("data"),
    })
}

fn condition<'a>(status_patch: &'a Value, type_: &str) -> &'a Value {
    status_patch["status"]["conditions"]
        .as_array()
        .expect("conditions")
        .iter()
        .find(|c| c["type"] == type_)
        .expect("condition")
}

#[tokio::test]
async fn new_policy_gets_its_config_map_and_a_ready_status() {
    let (ctx, handle) = context();
    let policy = policy(json!({"selector": {"matchLabels": {"app": "gw"}}}));
    let stored = serde_json::to_value(&policy).expect("policy");
    let gateway = serde_json::from_value(
        json!({"metadata": {"name": "gw-0", "labels": {"app": "gw"}},
        "spec": {"containers": [{"name": "envoy", "image": "envoy"}]}}),
    )
    .expect("pod");
    let injected = serde_json::to_value(inject(&gateway, &policy, &defaults())).expect("pod");
    let server = api_server(handle, move |method, uri, body| {
        match (method.as_str(), uri) {
            ("GET", u) if u.starts_with(CM_PATH) => (404, status(404, "NotFound")),
            ("GET", u) if u.starts_with("/api/v1/namespaces/tenant/pods") => {
                (200, pod_list(json!([injected.clone()])))
            }
            _ => (200, echo(&stored, body)),
        }
    });

    let action = reconcile_policy(&policy, &ctx).await.expect("reconciled");
    let metrics = ctx.metrics.clone();
    drop(ctx);
    let seen = server.await.expect("server");

    assert_eq!(action, Action::requeue(RESYNC));
    let uris: Vec<_> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.uri.as_str()))
        .collect();
    assert_eq!(
        uris,
        [
            ("GET", "/api/v1/namespaces/tenant/configmaps/vsp-gw-envoy"),
            ("PATCH", &*format!("{CM_PATH}/vsp-gw-envoy{APPLY_QUERY}")),
            ("POST", "/apis/events.k8s.io/v1/namespaces/tenant/events?"),
            (
                "GET",
                "/api/v1/namespaces/tenant/pods?&labelSelector=app%3Dgw"
            ),
            ("PATCH", &*format!("{STATUS_PATH}{APPLY_QUERY}")),
        ]
    );
    let cm = &seen[1].body;
    assert_eq!(cm["kind"], "ConfigMap");
    assert_eq!(cm["metadata"]["ownerReferences"][0]["uid"], POLICY_UID);
    assert_eq!(cm["metadata"]["ownerReferences"][0]["controller"], true);
    assert_eq!(
        cm["metadata"]["labels"]["virusscan.aether-platform.io/policy"],
        "gw"
    );
    let keys: Vec<_> = cm["data"]
        .as_object()
        .expect("data")
        .keys()
        .cloned()
        .collect();
    assert_eq!(
        keys,
        [
            envoy::KEY_BOOTSTRAP,
            envoy::KEY_CONNECTION_MANAGER,
            envoy::KEY_FILTER,
            envoy::KEY_CLUSTER,
            envoy::KEY_ROUTES
        ]
    );
    assert_eq!(seen[2].body["reason"], "ConfigGenerated");
    assert_eq!(seen[2].body["type"], "Normal");
    let patch = &seen[4].body;
    assert_eq!(patch["kind"], "VirusScanPolicy");
    assert_eq!(patch["status"]["observedGeneration"], 1);
    assert_eq!(patch["status"]["matchedPods"], 1);
    assert_eq!(patch["status"]["injectedPods"], 1);
    assert_eq!(patch["status"]["outdatedPods"], 0);
    assert_eq!(patch["status"]["configMapRef"], "vsp-gw-envoy");
    let ready = condition(patch, "Ready");
    assert_eq!(
        (&ready["status"], &ready["reason"]),
        (&json!("True"), &json!("Reconciled"))
    );
    assert_eq!(
        (
            writes_of(&metrics, "configmap"),
            writes_of(&metrics, "status")
        ),
        (1, 1)
    );
}

fn writes_of(metrics: &Metrics, kind: &str) -> u64 {
    metrics
        .writes
        .get_or_create(&KindLabel {
            kind: kind.to_owned(),
        })
        .get()
}

#[tokio::test]
async fn unmergeable_tenant_bootstrap_is_not_ready_and_writes_no_config_map() {
    let (ctx, handle) = context();
    let policy = policy(json!({
        "selector": {"matchLabels": {"app": "gw"}},
        "envoy": {"bootstrap": {"name": "gateway-envoy", "key": "envoy.yaml"}},
    }));
    let generated = current_config_map(&policy);
    let stored = serde_json::to_value(&policy).expect("policy");
    let server = api_server(handle, move |method, uri, body| {
        match (method.as_str(), uri) {
            ("GET", "/api/v1/namespaces/tenant/configmaps/vsp-gw-envoy") => {
                (200, generated.clone())
            }
            ("GET", "/api/v1/namespaces/tenant/configmaps/gateway-envoy") => (
                200,
                json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "gateway-envoy", "namespace": "tenant"},
                   "data": {"envoy.yaml": "static_resources: {clusters: []}\n"}}),
            ),
            ("GET", _) => (200, pod_list(json!([]))),
            _ => (200, echo(&stored, body)),
        }
    });

    let action = reconcile_policy(&policy, &ctx).await.expect("reconciled");
    let metrics = ctx.metrics.clone();
    drop(ctx);
    let seen = server.await.expect("server");

    assert_eq!(action, Action::requeue(RETRY_MISSING_BOOTSTRAP));
    let uris: Vec<_> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.uri.as_str()))
        .collect();
    assert_eq!(
        uris,
        [
            ("GET", "/api/v1/namespaces/tenant/configmaps/vsp-gw-envoy"),
            ("GET", "/api/v1/namespaces/tenant/configmaps/gateway-envoy"),
            ("POST", "/apis/events.k8s.io/v1/namespaces/tenant/events?"),
            (
                "GET",
                "/api/v1/namespaces/tenant/pods?&labelSelector=app%3Dgw"
            ),
            ("PATCH", &*format!("{STATUS_PATH}{APPLY_QUERY}")),
        ]
    );
    assert!(
        !seen
            .iter()
            .any(|s| s.method == Method::PATCH && s.uri.starts_with(CM_PATH))
    );
    assert_eq!(seen[2].body["type"], "Warning");
    assert_eq!(seen[2].body["reason"], "BootstrapInvalid");
    let patch = &seen[4].body;
    for type_ in ["ConfigGenerated", "Ready"] {
        let c = condition(patch, type_);
        assert_eq!(
            (&c["status"], &c["reason"]),
            (&json!("False"), &json!("BootstrapInvalid"))
        );
        let message = c["message"].as_str().expect("message");
        assert!(
            message.starts_with("ConfigMap gateway-envoy key envoy.yaml: ")
                && message.contains("no static_resources.listeners"),
            "{message}"
        );
    }
    assert_eq!(patch["status"]["derivedBootstrapRef"], Value::Null);
    assert_eq!(writes_of(&metrics, "configmap"), 0);
}

#[tokio::test]
async fn policy_being_deleted_is_left_to_the_garbage_collector() {
    let (ctx, handle) = context();
    let mut policy = policy(json!({"selector": {}}));
    policy.meta_mut().deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    let server = api_server(handle, |_, _, _| (500, status(500, "unexpected request")));

    let action = reconcile_policy(&policy, &ctx).await.expect("reconciled");
    drop(ctx);
    let seen = server.await.expect("server");

    assert_eq!(action, Action::await_change());
    assert!(seen.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn api_error_is_counted_by_its_label_and_requeued() {
    let (ctx, handle) = context();
    let policy = Arc::new(policy(json!({"selector": {}})));
    let server = api_server(handle, |_, _, _| (500, status(500, "InternalError")));

    let error = reconcile_policy(&policy, &ctx)
        .await
        .expect_err("API error");
    assert_eq!(error.metric_label(), "api_error");
    assert!(error.is_retryable());
    let action = error_policy(policy.clone(), &error, ctx.clone());
    assert_eq!(action, Action::requeue(RETRY_ERROR));
    let failed = ctx
        .metrics
        .errors
        .get_or_create(&ReasonLabel {
            reason: "api_error".to_owned(),
        })
        .get();
    assert_eq!(failed, 1);
    assert_eq!(writes_of(&ctx.metrics, "configmap"), 0);
    drop(ctx);
    let seen = server.await.expect("server");
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(seen[0].is(
        Method::GET,
        "/api/v1/namespaces/tenant/configmaps/vsp-gw-envoy"
    ));
}

#[tokio::test]
async fn policy_already_in_step_is_only_read() {
    let (ctx, handle) = context();
    let mut policy = policy(json!({"selector": {"matchLabels": {"app": "gw"}}}));
    policy.status = Some(super::status::status(
        &policy,
        &super::status::Generated::config_map("vsp-gw-envoy"),
        &super::status::PodCounts::default(),
        "vsp-gw-envoy",
        &crate::gateways::detect(&policy.spec, []),
        Vec::new(),
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    ));
    let generated = current_config_map(&policy);
    let server = api_server(handle, move |method, uri, _| match (method.as_str(), uri) {
        ("GET", "/api/v1/namespaces/tenant/configmaps/vsp-gw-envoy") => (200, generated.clone()),
        ("GET", _) => (200, pod_list(json!([]))),
        _ => (500, status(500, "unexpected write")),
    });

    let action = reconcile_policy(&policy, &ctx).await.expect("reconciled");
    drop(ctx);
    let seen = server.await.expect("server");

    assert_eq!(action, Action::requeue(RESYNC));
    let uris: Vec<_> = seen
        .iter()
        .map(|s| (s.method.as_str(), s.uri.as_str()))
        .collect();
    assert_eq!(
        uris,
        [
            ("GET", "/api/v1/namespaces/tenant/configmaps/vsp-gw-envoy"),
            (
                "GET",
                "/api/v1/namespaces/tenant/pods?&labelSelector=app%3Dgw"
            ),
        ]
    );
}
