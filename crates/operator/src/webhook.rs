//! The sidecar injector: AdmissionReview v1 for Pod CREATE over HTTPS. Every replica serves
//! it (the API server may call any of them); it reads policies from a watch-fed cache and
//! never writes, so it needs no leadership.
//!
//! Until that cache has synced, "no policy selects this pod" cannot be told apart from "the
//! policy is not loaded yet": the replica is not ready, and a pod is refused rather than let
//! through without its sidecar (its ReplicaSet tries again).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::certs::CertResolver;
use crate::crd::VirusScanPolicy;
use crate::inject::{self, Decision, InjectDefaults};

/// The largest AdmissionReview accepted; a Pod is far smaller.
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone)]
pub struct WebhookMetrics {
    pub requests: Family<ResultLabel, Counter>,
    pub duration: Histogram,
}

impl WebhookMetrics {
    pub fn register(registry: &mut Registry) -> WebhookMetrics {
        let m = WebhookMetrics {
            requests: Family::default(),
            duration: Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1]),
        };
        registry.register(
            "admission_requests",
            "Admission reviews by result: injected, skipped, denied, not_synced, invalid",
            m.requests.clone(),
        );
        registry.register(
            "admission_duration_seconds",
            "Time to answer one admission review",
            m.duration.clone(),
        );
        m
    }

    fn count(&self, result: &'static str) {
        self.requests.get_or_create(&ResultLabel { result }).inc();
    }
}

#[derive(Clone)]
pub struct Injector {
    pub policies: Store<VirusScanPolicy>,
    pub defaults: Arc<InjectDefaults>,
    pub metrics: WebhookMetrics,
    /// Where Envoy Gateway runs the proxies of Gateways in other namespaces (see
    /// [`inject::deciding_namespace`]); `None` turns that off.
    pub envoy_gateway_namespace: Option<String>,
}

/// What a pod is told while the policy cache is still loading.
pub const NOT_SYNCED: &str = "the virus-scanner sidecar injector has not loaded the VirusScanPolicies yet, so it cannot tell whether this pod needs the scanning sidecar; the pod is refused rather than started unprotected (its controller retries it)";

impl Injector {
    /// Whether the policy cache holds a complete list from the API server.
    pub fn policies_synced(&self) -> bool {
        self.policies
            .wait_until_ready()
            .now_or_never()
            .is_some_and(|r| r.is_ok())
    }
}

/// A policy cache fed by a watch; the returned future drives it.
pub fn policy_cache(client: Client) -> (Store<VirusScanPolicy>, impl Future<Output = ()>) {
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<VirusScanPolicy>::all(client),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|event| async move {
        if let Err(e) = event {
            tracing::warn!(error = %e, "policy watch failed");
        }
    });
    (reader, stream)
}

pub fn router(injector: Injector) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_REVIEW_BYTES))
        .with_state(injector)
}

async fn mutate(State(injector): State<Injector>, body: Bytes) -> Response {
    let started = Instant::now();
    let review: AdmissionReview<DynamicObject> = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            injector.metrics.count("invalid");
            return bad_request(format!("malformed AdmissionReview: {e}"));
        }
    };
    let request: AdmissionRequest<DynamicObject> = match review.try_into() {
        Ok(r) => r,
        Err(e) => {
            injector.metrics.count("invalid");
            return bad_request(format!("AdmissionReview without a request: {e}"));
        }
    };
    let (response, result) = review_pod(&injector, &request);
    injector.metrics.count(result);
    let body = serde_json::to_vec(&response.into_review());
    injector
        .metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    match body {
        Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn bad_request(message: String) -> Response {
    tracing::warn!(%message, "refused an admission request");
    (StatusCode::BAD_REQUEST, message).into_response()
}

fn review_pod(
    injector: &Injector,
    request: &AdmissionRequest<DynamicObject>,
) -> (AdmissionResponse, &'static str) {
    let allow = AdmissionResponse::from(request);
    if request.kind.kind != "Pod" || request.operation != Operation::Create {
        return (allow, "skipped");
    }
    let Some(object) = &request.object else {
        return (allow.deny("the review carries no Pod"), "denied");
    };
    let original = match serde_json::to_value(object) {
        Ok(v) => v,
        Err(e) => return (allow.deny(format!("unreadable Pod: {e}")), "denied"),
    };
    let pod: Pod = match serde_json::from_value(original) {
        Ok(p) => p,
        Err(e) => return (allow.deny(format!("unreadable Pod: {e}")), "denied"),
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_default();
    // An opt-out needs no policy to be honoured.
    if !injector.policies_synced() && !inject::opted_out(&pod) {
        tracing::warn!(namespace, "refused a pod: the policy cache has not synced");
        return (allow.deny(NOT_SYNCED), "not_synced");
    }
    let policies = injector.policies.state();
    let (deciding, envoy_gateway_only) = inject::deciding_namespace(
        &pod,
        &namespace,
        injector.envoy_gateway_namespace.as_deref(),
    );
    let decision = inject::decide(
        &pod,
        deciding,
        policies
            .iter()
            .map(|p| p.as_ref())
            .filter(|p| !envoy_gateway_only || is_envoy_gateway(p)),
        &injector.defaults,
    );
    match decision {
        Decision::Skip(_) => (allow, "skipped"),
        Decision::Deny(reason) => (allow.deny(reason), "denied"),
        Decision::Inject(policy) => {
            let mutated = inject::inject(&pod, policy, &injector.defaults);
            if inject::check(&mutated, policy, &injector.defaults) != inject::Injection::Verified {
                return (
                    allow.deny(format!(
                        "the pod cannot be given the sidecar of VirusScanPolicy {}: its containers or volumes clash with the injector's",
                        policy.name_any()
                    )),
                    "denied",
                );
            }
            // Both sides go through the same serializer, so the patch holds our changes only.
            let (Ok(before), Ok(after)) =
                (serde_json::to_value(&pod), serde_json::to_value(&mutated))
            else {
                return (allow.deny("cannot serialise the Pod"), "denied");
            };
            let patch = json_patch::diff(&before, &after);
            match allow.clone().with_patch(patch) {
                Ok(response) => {
                    tracing::info!(
                        pod = pod
                            .metadata
                            .name
                            .as_deref()
                            .or(pod.metadata.generate_name.as_deref())
                            .unwrap_or_default(),
                        namespace,
                        policy = policy.metadata.name.as_deref().unwrap_or_default(),
                        "injected the producer sidecar"
                    );
                    (response, "injected")
                }
                Err(e) => (
                    allow.deny(format!("cannot encode the patch: {e}")),
                    "denied",
                ),
            }
        }
    }
}

/// A policy for Envoy Gateway, by `spec.gateway` or its selector's labels.
fn is_envoy_gateway(policy: &VirusScanPolicy) -> bool {
    crate::gateways::detect(&policy.spec, []).kind == crate::crd::GatewayKind::EnvoyGateway
}

/// Serves the router over TLS with the resolver's current certificate until `shutdown`.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    resolver: Arc<CertResolver>,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), rustls::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    tokio::pin!(shutdown);
    loop {
        let (tcp, _) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook accept failed");
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            // A client that never finishes its handshake must not hold a task forever.
            let handshake =
                tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp));
            let Ok(Ok(stream)) = handshake.await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
        });
    }
}
