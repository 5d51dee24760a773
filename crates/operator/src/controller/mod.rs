//! The controller: for each VirusScanPolicy, a ConfigMap with the generated Envoy
//! configuration (owned by the policy, put back when edited or deleted), a derived bootstrap
//! when the policy names the gateway's own, pod counts from a Pod watch, status by
//! server-side apply and Events on changes and errors. The status itself is computed in
//! [`status`], without the API; the writes are in `writes`.

mod gateway_objects;
pub mod protection;
#[cfg(test)]
mod scenarios;
pub mod status;
mod writes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use self::status::{Generated, PodCounts};
use self::writes::{apply_config_map, derive_bootstrap, publish, restart_outdated};
use crate::crd::{GatewayKind, VirusScanPolicy};
use crate::error::Error;
use crate::inject::{self, InjectDefaults};
use crate::metrics::Metrics;
use crate::selector;
use crate::{envoy, gateways};

/// Field manager of every server-side apply.
pub const MANAGER: &str = "virus-scan-operator";
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "virus-scan-operator");
pub const POLICY_LABEL: &str = "virusscan.aether-platform.io/policy";
/// Pod annotations the injector writes (the policy, its generation and a hash of what was
/// injected), and the ConfigMap a bootstrap merge derives: the injector's names.
pub use crate::inject::{ANNOTATION_GENERATION, ANNOTATION_POLICY, derived_bootstrap_name};
/// On a policy, `"true"` lets the operator restart the Deployments of outdated pods.
pub const ANNOTATION_RESTART_OUTDATED: &str = "virusscan.aether-platform.io/restart-outdated";
/// On a Deployment's pod template: the policy generation it was restarted for.
pub const ANNOTATION_RESTARTED_FOR: &str = "virusscan.aether-platform.io/restarted-for-generation";

const RESYNC: Duration = Duration::from_secs(300);
/// How soon an Envoy Gateway or Istio policy is looked at again: the overrides in the
/// gateway's API that its status reports are read, not watched (the kinds may not be served).
const RESYNC_GATEWAY_API: Duration = Duration::from_secs(60);
const RETRY_MISSING_BOOTSTRAP: Duration = Duration::from_secs(30);
const RETRY_ERROR: Duration = Duration::from_secs(10);

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// What the injector fills in where a policy is silent; a pod counts as injected only
    /// when it carries what the injector would inject now.
    pub defaults: Arc<InjectDefaults>,
    /// Where Envoy Gateway runs the proxies of Gateways whose deploy mode is not
    /// `GatewayNamespace`: they belong to the Envoy Gateway policies of the namespace their
    /// owning-gateway label names.
    pub envoy_gateway_namespace: Option<String>,
    /// Istio's root namespace: its EnvoyFilters apply to the workloads of every namespace.
    pub istio_root_namespace: Option<String>,
}

impl Context {
    pub fn new(
        client: Client,
        identity: &str,
        metrics: Metrics,
        defaults: Arc<InjectDefaults>,
    ) -> Context {
        let reporter = Reporter {
            controller: MANAGER.to_owned(),
            instance: Some(identity.to_owned()),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            defaults,
            envoy_gateway_namespace: None,
            istio_root_namespace: None,
        }
    }

    pub fn with_istio_root_namespace(mut self, namespace: Option<String>) -> Context {
        self.istio_root_namespace = namespace;
        self
    }

    pub fn with_envoy_gateway_namespace(mut self, namespace: Option<String>) -> Context {
        self.envoy_gateway_namespace = namespace;
        self
    }
}

pub fn config_map_name(policy: &str) -> String {
    format!("vsp-{policy}-envoy")
}

/// Runs until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let policies: Api<VirusScanPolicy> = Api::all(client.clone());
    let controller = Controller::new(policies, watcher::Config::default());
    let store = controller.store();
    let pod_store = store.clone();
    let envoy_gateway = ctx.envoy_gateway_namespace.clone();
    let controller = controller
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            move |pod| policies_selecting(&pod_store, &pod, envoy_gateway.as_deref()),
        )
        .watches(
            Api::<ConfigMap>::all(client),
            watcher::Config::default(),
            move |cm| policies_using(&store, &cm),
        )
        .graceful_shutdown_on(shutdown);
    controller
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile failed");
            }
        })
        .await;
}

/// Policies whose selector matches the pod: those of its namespace or, for an Envoy Gateway
/// proxy in Envoy Gateway's namespace, those of its Gateway's namespace.
fn policies_selecting(
    store: &Store<VirusScanPolicy>,
    pod: &Pod,
    envoy_gateway: Option<&str>,
) -> Vec<ObjectRef<VirusScanPolicy>> {
    let labels = pod.labels();
    let pod_namespace = pod.namespace().unwrap_or_default();
    let (namespace, _) = inject::deciding_namespace(pod, &pod_namespace, envoy_gateway);
    store
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .filter(|p| selector::matches(&p.spec.selector, labels))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The policy that owns a generated ConfigMap, and the policies whose bootstrap it is.
fn policies_using(
    store: &Store<VirusScanPolicy>,
    cm: &ConfigMap,
) -> Vec<ObjectRef<VirusScanPolicy>> {
    let name = cm.name_any();
    store
        .state()
        .iter()
        .filter(|p| p.namespace() == cm.namespace())
        .filter(|p| {
            let owns = cm
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == p.meta().uid.as_ref());
            let bootstrap = p
                .spec
                .envoy
                .bootstrap
                .as_ref()
                .is_some_and(|b| b.name == name);
            owns || bootstrap
        })
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// Counts the failure by its label; tries again soon when that can help, at the next
/// resync otherwise (a change to the policy reconciles it at once anyway).
fn error_policy(_policy: Arc<VirusScanPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, reason = error.metric_label(), "reconcile failed");
    ctx.metrics.failed(error.metric_label());
    if error.is_retryable() {
        Action::requeue(RETRY_ERROR)
    } else {
        Action::requeue(RESYNC)
    }
}

async fn reconcile(policy: Arc<VirusScanPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    ctx.metrics.reconciles.inc();
    let result = reconcile_policy(&policy, &ctx).await;
    ctx.metrics
        .duration
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_policy(policy: &VirusScanPolicy, ctx: &Context) -> Result<Action, Error> {
    // A policy being deleted takes its ConfigMaps with it (they are owned by it); writing
    // them again, or its status, would only race the garbage collector.
    if policy.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let namespace = policy.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = policy.name_any();
    let owner = policy
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("uid"))?;
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);

    let cm_name = config_map_name(&name);
    let data = envoy::config_map_data(&policy.spec)?;
    if apply_config_map(ctx, &config_maps, &cm_name, &name, &owner, data).await? {
        publish(
            ctx,
            policy,
            EventType::Normal,
            "ConfigGenerated",
            format!("wrote ConfigMap {cm_name}"),
        )
        .await;
    }

    let mut generated = match &policy.spec.envoy.bootstrap {
        None => Generated::config_map(&cm_name),
        Some(source) => derive_bootstrap(ctx, policy, &config_maps, source, &owner).await?,
    };
    if !generated.status {
        publish(
            ctx,
            policy,
            EventType::Warning,
            generated.reason,
            generated.message.clone(),
        )
        .await;
    }

    let mut pods = list_pods(ctx, &namespace, policy).await?;
    let detected = gateways::detect(&policy.spec, pods.iter().map(|p| p.labels()));
    if detected.kind == GatewayKind::EnvoyGateway {
        pods.extend(list_envoy_gateway_proxies(ctx, &namespace, policy).await?);
    }
    if generated.status
        && let Some(outcome) =
            gateway_objects::reconcile(ctx, policy, &namespace, &owner, &detected).await?
    {
        if !outcome.status {
            publish(
                ctx,
                policy,
                EventType::Warning,
                outcome.reason,
                outcome.message.clone(),
            )
            .await;
        }
        generated = outcome;
    }
    let istio_overrides = match detected.kind {
        GatewayKind::Istio => {
            gateway_objects::istio_overrides(ctx, &namespace, &owner, &pods).await?
        }
        _ => Vec::new(),
    };
    let pods = PodCounts::of(policy, &ctx.defaults, pods);
    // Only the policy's own namespace: Envoy Gateway rolls out the proxies it runs itself.
    let restartable: Vec<Pod> = pods
        .outdated
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace.as_str()))
        .cloned()
        .collect();
    if !restartable.is_empty()
        && policy
            .annotations()
            .get(ANNOTATION_RESTART_OUTDATED)
            .is_some_and(|v| v == "true")
    {
        restart_outdated(ctx, policy, &namespace, &restartable).await?;
    }
    let eg_gateway = gateways::envoy_gateway::gateway_name(&policy.spec);
    let overrides = match (detected.kind, &eg_gateway) {
        (GatewayKind::EnvoyGateway, Some(gateway)) => {
            gateway_objects::overrides(ctx, policy, &namespace, &owner, gateway).await?
        }
        _ => istio_overrides,
    };
    let gateway_states = protection::gateways(
        detected.kind,
        eg_gateway.as_deref(),
        &namespace,
        &pods.selected,
        &overrides,
        if generated.status {
            Ok(())
        } else {
            Err(generated.message.as_str())
        },
    );

    let status = status::status(
        policy,
        &generated,
        &pods,
        &cm_name,
        &detected,
        gateway_states,
        Timestamp::now(),
    );
    if policy.status.as_ref() != Some(&status) {
        let policies: Api<VirusScanPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = json!({
            "apiVersion": VirusScanPolicy::api_version(&()),
            "kind": VirusScanPolicy::kind(&()),
            "status": status,
        });
        policies
            .patch_status(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await?;
        ctx.metrics.wrote("status");
    }
    let requeue = match detected.kind {
        GatewayKind::EnvoyGateway | GatewayKind::Istio => generated.requeue.min(RESYNC_GATEWAY_API),
        _ => generated.requeue,
    };
    Ok(Action::requeue(requeue))
}

/// An Envoy Gateway policy's proxies in Envoy Gateway's own namespace: its selector, and
/// the owning-gateway-namespace label naming the policy's namespace.
async fn list_envoy_gateway_proxies(
    ctx: &Context,
    namespace: &str,
    policy: &VirusScanPolicy,
) -> Result<Vec<Pod>, Error> {
    let Some(eg) = ctx.envoy_gateway_namespace.as_deref() else {
        return Ok(Vec::new());
    };
    if eg == namespace {
        return Ok(Vec::new());
    }
    let Some(mut selector) = selector::parse(&policy.spec.selector) else {
        return Ok(Vec::new());
    };
    selector.extend(kube::core::Expression::Equal(
        gateways::EG_OWNING_GATEWAY_NAMESPACE.to_owned(),
        namespace.to_owned(),
    ));
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), eg);
    Ok(pods
        .list(&ListParams::default().labels_from(&selector))
        .await?
        .items)
}

/// The policy's pods; the API server filters them by its selector.
async fn list_pods(
    ctx: &Context,
    namespace: &str,
    policy: &VirusScanPolicy,
) -> Result<Vec<Pod>, Error> {
    let Some(selector) = selector::parse(&policy.spec.selector) else {
        return Ok(Vec::new());
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels_from(&selector))
        .await?;
    Ok(list.items)
}
