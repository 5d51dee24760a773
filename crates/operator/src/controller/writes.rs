//! The reconciler's writes: generated ConfigMaps by server-side apply (only when they
//! differ), the derived bootstrap, Deployment restarts for outdated pods, and Events.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::status::Generated;
use super::{
    ANNOTATION_RESTARTED_FOR, Context, MANAGED_BY, MANAGER, POLICY_LABEL, derived_bootstrap_name,
};
use crate::crd::{ConfigMapKeyRef, VirusScanPolicy};
use crate::error::Error;
use crate::{bootstrap, envoy};

/// Server-side applies a generated ConfigMap when its content or ownership differs from
/// what is stored; returns whether it wrote.
pub(super) async fn apply_config_map(
    ctx: &Context,
    api: &Api<ConfigMap>,
    name: &str,
    policy: &str,
    owner: &OwnerReference,
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

/// Merges the policy into the tenant's bootstrap and writes the derived one. What the
/// tenant got wrong (no such ConfigMap or key, a bootstrap that cannot take the policy) is
/// an outcome for the status, not an error: no retry fixes it.
pub(super) async fn derive_bootstrap(
    ctx: &Context,
    policy: &VirusScanPolicy,
    api: &Api<ConfigMap>,
    source: &ConfigMapKeyRef,
    owner: &OwnerReference,
) -> Result<Generated, Error> {
    let Some(tenant) = api.get_opt(&source.name).await? else {
        return Ok(Generated::failed(
            "BootstrapNotFound",
            format!("ConfigMap {} does not exist", source.name),
        ));
    };
    let Some(text) = tenant.data.as_ref().and_then(|d| d.get(&source.key)) else {
        return Ok(Generated::failed(
            "BootstrapKeyMissing",
            format!("ConfigMap {} has no key {}", source.name, source.key),
        ));
    };
    let invalid = |e: &dyn std::fmt::Display| {
        Generated::failed(
            "BootstrapInvalid",
            format!("ConfigMap {} key {}: {e}", source.name, source.key),
        )
    };
    let (merged, report) = match bootstrap::merge(text, &policy.spec) {
        Ok(m) => m,
        Err(e) => return Ok(invalid(&e)),
    };
    let yaml = match envoy::to_yaml(&merged) {
        Ok(y) => y,
        Err(e) => return Ok(invalid(&e)),
    };
    let name = derived_bootstrap_name(&policy.name_any());
    let data = BTreeMap::from([(source.key.clone(), yaml)]);
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
    Ok(Generated::derived(name, source.key.clone(), &report))
}

/// Restarts (as `kubectl rollout restart` does) the Deployments that own outdated pods,
/// once per policy generation.
pub(super) async fn restart_outdated(
    ctx: &Context,
    policy: &VirusScanPolicy,
    namespace: &str,
    outdated: &[Pod],
) -> Result<(), Error> {
    let generation = policy.metadata.generation.unwrap_or_default().to_string();
    let replica_sets: Api<ReplicaSet> = Api::namespaced(ctx.client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let mut names = BTreeSet::new();
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

fn controller_of(owners: &[OwnerReference], kind: &str) -> Option<String> {
    owners
        .iter()
        .find(|o| o.kind == kind && o.controller == Some(true))
        .map(|o| o.name.clone())
}

pub(super) async fn publish(
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
