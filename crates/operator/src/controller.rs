//! The controller: for each VirusScanPolicy, a ConfigMap with the generated Envoy
//! configuration (owned by the policy, put back when edited or deleted), a derived bootstrap
//! when the policy names the gateway's own, pod counts from a Pod watch, status by
//! server-side apply and Events on changes and errors.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::json;

use crate::bootstrap;
use crate::crd::{ConfigMapKeyRef, VirusScanPolicy, VirusScanPolicyStatus};
use crate::envoy;
use crate::error::Error;
use crate::metrics::Metrics;
use crate::selector;

/// Field manager of every server-side apply.
pub const MANAGER: &str = "virus-scan-operator";
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "virus-scan-operator");
pub const POLICY_LABEL: &str = "virusscan.aether-platform.io/policy";
/// Pod annotations the injector writes: the policy, its generation, and a hash of what
/// was injected.
pub const ANNOTATION_POLICY: &str = "virusscan.aether-platform.io/policy";
pub const ANNOTATION_GENERATION: &str = "virusscan.aether-platform.io/policy-generation";
/// On a policy, `"true"` lets the operator restart the Deployments of outdated pods.
pub const ANNOTATION_RESTART_OUTDATED: &str = "virusscan.aether-platform.io/restart-outdated";
/// On a Deployment's pod template: the policy generation it was restarted for.
pub const ANNOTATION_RESTARTED_FOR: &str = "virusscan.aether-platform.io/restarted-for-generation";

const RESYNC: Duration = Duration::from_secs(300);
const RETRY_MISSING_BOOTSTRAP: Duration = Duration::from_secs(30);
const RETRY_ERROR: Duration = Duration::from_secs(10);

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
}

impl Context {
    pub fn new(client: Client, identity: &str, metrics: Metrics) -> Context {
        let reporter = Reporter {
            controller: MANAGER.to_owned(),
            instance: Some(identity.to_owned()),
        };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
        }
    }
}

pub fn config_map_name(policy: &str) -> String {
    format!("vsp-{policy}-envoy")
}

pub fn derived_bootstrap_name(policy: &str) -> String {
    format!("vsp-{policy}-bootstrap")
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
    let controller = controller
        .watches(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            move |pod| policies_selecting(&pod_store, &pod),
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

/// Policies in the pod's namespace whose selector matches it.
fn policies_selecting(
    store: &Store<VirusScanPolicy>,
    pod: &Pod,
) -> Vec<ObjectRef<VirusScanPolicy>> {
    let labels = pod.labels();
    store
        .state()
        .iter()
        .filter(|p| p.namespace() == pod.namespace())
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

fn error_policy(_policy: Arc<VirusScanPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(error = %error, reason = error.metric_label(), "reconcile failed");
    ctx.metrics.failed(error.metric_label());
    Action::requeue(RETRY_ERROR)
}

/// The outcome of writing the bootstrap, for the ConfigGenerated condition.
struct Generated {
    status: bool,
    reason: &'static str,
    message: String,
    derived: Option<ConfigMapKeyRef>,
    requeue: Duration,
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
    let namespace = policy.namespace().ok_or(Error::MissingField("namespace"))?;
    let name = policy.name_any();
    let owner = policy
        .controller_owner_ref(&())
        .ok_or(Error::MissingField("uid"))?;
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);

    let cm_name = config_map_name(&name);
    let data = envoy::config_map_data(&policy.spec);
    let wrote = apply_config_map(ctx, &config_maps, &cm_name, &name, &owner, data).await?;
    if wrote {
        publish(
            ctx,
            policy,
            EventType::Normal,
            "ConfigGenerated",
            format!("wrote ConfigMap {cm_name}"),
        )
        .await;
    }

    let generated = match &policy.spec.envoy.bootstrap {
        None => Generated {
            status: true,
            reason: "Generated",
            message: format!("Envoy configuration in ConfigMap {cm_name}"),
            derived: None,
            requeue: RESYNC,
        },
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

    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let (matched, injected, outdated_pods) = count_pods(&pods, policy).await?;
    let outdated = i32::try_from(outdated_pods.len()).unwrap_or(i32::MAX);
    if !outdated_pods.is_empty()
        && policy
            .annotations()
            .get(ANNOTATION_RESTART_OUTDATED)
            .is_some_and(|v| v == "true")
    {
        restart_outdated(ctx, policy, &namespace, &outdated_pods).await?;
    }

    let generation = policy.metadata.generation;
    let previous = policy.status.clone().unwrap_or_default();
    let conditions = vec![
        condition(
            &previous,
            "ConfigGenerated",
            generated.status,
            generated.reason,
            &generated.message,
            generation,
        ),
        condition(
            &previous,
            "Ready",
            generated.status,
            if generated.status {
                "Reconciled"
            } else {
                generated.reason
            },
            &if generated.status {
                format!("{matched} pods matched, {injected} injected, {outdated} outdated")
            } else {
                generated.message.clone()
            },
            generation,
        ),
    ];
    let status = VirusScanPolicyStatus {
        observed_generation: generation,
        conditions,
        matched_pods: matched,
        injected_pods: injected,
        outdated_pods: outdated,
        config_map_ref: Some(cm_name),
        derived_bootstrap_ref: generated.derived,
    };
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
    Ok(Action::requeue(generated.requeue))
}

/// Server-side applies a generated ConfigMap when its content or ownership differs from
/// what is stored; returns whether it wrote.
async fn apply_config_map(
    ctx: &Context,
    api: &Api<ConfigMap>,
    name: &str,
    policy: &str,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    data: BTreeMap<String, String>,
) -> Result<bool, Error> {
    let existing = api.get_opt(name).await?;
    let current = existing.as_ref().is_some_and(|cm| {
        cm.data.as_ref() == Some(&data)
            && cm.owner_references().iter().any(|o| o.uid == owner.uid)
            && cm.labels().get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1)
    });
    if current {
        return Ok(false);
    }
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
                (POLICY_LABEL.to_owned(), policy.to_owned()),
            ])),
            owner_references: Some(vec![owner.clone()]),
            ..ObjectMeta::default()
        },
        data: Some(data),
        ..ConfigMap::default()
    };
    let mut value = serde_json::to_value(&cm).map_err(|_| Error::MissingField("config map"))?;
    value["apiVersion"] = json!("v1");
    value["kind"] = json!("ConfigMap");
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(value),
    )
    .await?;
    ctx.metrics.wrote("configmap");
    Ok(true)
}

async fn derive_bootstrap(
    ctx: &Context,
    policy: &VirusScanPolicy,
    api: &Api<ConfigMap>,
    source: &ConfigMapKeyRef,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> Result<Generated, Error> {
    let failed = |reason, message: String| Generated {
        status: false,
        reason,
        message,
        derived: None,
        requeue: RETRY_MISSING_BOOTSTRAP,
    };
    let Some(tenant) = api.get_opt(&source.name).await? else {
        return Ok(failed(
            "BootstrapNotFound",
            format!("ConfigMap {} does not exist", source.name),
        ));
    };
    let Some(text) = tenant.data.as_ref().and_then(|d| d.get(&source.key)) else {
        return Ok(failed(
            "BootstrapKeyMissing",
            format!("ConfigMap {} has no key {}", source.name, source.key),
        ));
    };
    let (merged, report) = match bootstrap::merge(text, &policy.spec) {
        Ok(m) => m,
        Err(e) => {
            return Ok(failed(
                "BootstrapInvalid",
                format!("ConfigMap {} key {}: {e}", source.name, source.key),
            ));
        }
    };
    let name = derived_bootstrap_name(&policy.name_any());
    let data = BTreeMap::from([(source.key.clone(), envoy::to_yaml(&merged))]);
    if apply_config_map(ctx, api, &name, &policy.name_any(), owner, data).await? {
        publish(
            ctx,
            policy,
            EventType::Normal,
            "BootstrapDerived",
            format!("wrote ConfigMap {name} from {}", source.name),
        )
        .await;
    }
    let mut message = format!(
        "derived bootstrap in ConfigMap {name}: {} connection managers filtered, routes opted out: {:?}",
        report.connection_managers, report.disabled_routes
    );
    if !report.unmatched_opt_outs.is_empty() {
        message.push_str(&format!(
            "; opt-outs that match no route: {:?}",
            report.unmatched_opt_outs
        ));
    }
    Ok(Generated {
        status: true,
        reason: "BootstrapDerived",
        message,
        derived: Some(ConfigMapKeyRef {
            name,
            key: source.key.clone(),
        }),
        requeue: RESYNC,
    })
}

/// Pods the policy selects; of those, pods carrying its sidecar; of those, pods injected
/// from an older generation.
async fn count_pods(
    api: &Api<Pod>,
    policy: &VirusScanPolicy,
) -> Result<(i32, i32, Vec<Pod>), Error> {
    let name = policy.name_any();
    let generation = policy.metadata.generation.unwrap_or_default().to_string();
    let (mut matched, mut injected, mut outdated) = (0, 0, Vec::new());
    let Some(selector) = selector::parse(&policy.spec.selector) else {
        return Ok((0, 0, outdated));
    };
    // The API server filters by the selector: only the policy's pods come back.
    for pod in api
        .list(&ListParams::default().labels_from(&selector))
        .await?
    {
        matched += 1;
        let annotations = pod.annotations();
        if annotations.get(ANNOTATION_POLICY) == Some(&name) {
            injected += 1;
            if annotations.get(ANNOTATION_GENERATION) != Some(&generation) {
                outdated.push(pod);
            }
        }
    }
    Ok((matched, injected, outdated))
}

/// Restarts (as `kubectl rollout restart` does) the Deployments that own outdated pods,
/// once per policy generation.
async fn restart_outdated(
    ctx: &Context,
    policy: &VirusScanPolicy,
    namespace: &str,
    outdated: &[Pod],
) -> Result<(), Error> {
    use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
    let generation = policy.metadata.generation.unwrap_or_default().to_string();
    let replica_sets: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let mut names = std::collections::BTreeSet::new();
    for pod in outdated {
        let Some(rs) = controller_of(pod.owner_references(), "ReplicaSet") else {
            continue;
        };
        let Some(rs) = replica_sets.get_opt(&rs).await? else {
            continue;
        };
        if let Some(d) = controller_of(rs.owner_references(), "Deployment") {
            names.insert(d);
        }
    }
    for name in names {
        let Some(deployment) = deployments.get_opt(&name).await? else {
            continue;
        };
        let done = deployment
            .spec
            .as_ref()
            .and_then(|s| s.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(ANNOTATION_RESTARTED_FOR))
            == Some(&generation);
        if done {
            continue;
        }
        let patch = json!({"spec": {"template": {"metadata": {"annotations": {
            ANNOTATION_RESTARTED_FOR: generation,
            "kubectl.kubernetes.io/restartedAt": Timestamp::now().to_string(),
        }}}}});
        deployments
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        ctx.metrics.wrote("deployment");
        publish(
            ctx,
            policy,
            EventType::Normal,
            "RestartedDeployment",
            format!("restarted Deployment {name}: its pods carry a sidecar from an older policy generation"),
        )
        .await;
    }
    Ok(())
}

fn controller_of(
    owners: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference],
    kind: &str,
) -> Option<String> {
    owners
        .iter()
        .find(|o| o.kind == kind && o.controller == Some(true))
        .map(|o| o.name.clone())
}

/// A condition; its transition time moves only when its status changes.
fn condition(
    previous: &VirusScanPolicyStatus,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = previous
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(
            || Time(Timestamp::now()),
            |c| c.last_transition_time.clone(),
        );
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time,
    }
}

async fn publish(
    ctx: &Context,
    policy: &VirusScanPolicy,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: "Reconcile".to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &policy.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish an event");
    }
}
