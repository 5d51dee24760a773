//! The objects an Envoy Gateway or Istio policy takes, written by server-side apply with the
//! policy as their controller owner (deleting the policy lets the garbage collector remove
//! them), rewritten when they drift from what the policy renders, and removed when the
//! policy no longer renders them (a route opt-out dropped, the gateway kind changed).

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::status::Generated;
use super::writes::publish;
use super::{Context, MANAGED_BY, MANAGER, POLICY_LABEL};
use crate::crd::{GatewayKind, VirusScanPolicy};
use crate::error::Error;
use crate::gateways::{self, Detected, KINDS};

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Writes what the policy renders for `detected.kind` and removes the rest of its objects.
/// Whether anything is done at all: for plain Envoy, only when an earlier status says the
/// policy had gateway objects to remove.
pub(super) async fn reconcile(
    ctx: &Context,
    policy: &VirusScanPolicy,
    namespace: &str,
    owner: &OwnerReference,
    detected: &Detected,
) -> Result<Option<Generated>, Error> {
    let previous = policy.status.as_ref().and_then(|s| s.gateway);
    let had_objects = previous.is_some_and(|k| k != GatewayKind::Envoy);
    if detected.kind == GatewayKind::Envoy && !had_objects {
        return Ok(None);
    }
    let name = policy.name_any();
    let desired = match gateways::render(detected.kind, &name, namespace, &policy.spec) {
        Ok(objects) => objects,
        Err(e) => {
            // Nothing half-written: what was applied for an earlier generation stays, and
            // the status says why this one is not.
            return Ok(Some(Generated::failed(e.reason(), e.to_string())));
        }
    };
    let mut written = Vec::new();
    let mut keep = BTreeSet::new();
    for mut object in desired {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let object_name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let Some(&(group, version, _, plural)) = KINDS.iter().find(|k| k.2 == kind) else {
            continue;
        };
        keep.insert((kind.clone(), object_name.clone()));
        object["metadata"]["ownerReferences"] = serde_json::json!([owner]);
        object["metadata"]["labels"] =
            serde_json::json!({ MANAGED_BY.0: MANAGED_BY.1, POLICY_LABEL: name });
        let api: Api<DynamicObject> = Api::namespaced_with(
            ctx.client.clone(),
            namespace,
            &resource(group, version, &kind, plural),
        );
        let existing = match api.get_opt(&object_name).await {
            Ok(o) => o,
            Err(e) if not_found(&e) => {
                return Ok(Some(missing_api(&kind, group)));
            }
            Err(e) => return Err(e.into()),
        };
        let current = existing.as_ref().is_some_and(|o| {
            o.data.get("spec") == object.get("spec")
                && o.owner_references().iter().any(|r| r.uid == owner.uid)
                && o.labels().get(POLICY_LABEL) == Some(&name)
        });
        if current {
            continue;
        }
        match api
            .patch(
                &object_name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&object),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if not_found(&e) => return Ok(Some(missing_api(&kind, group))),
            Err(kube::Error::Api(s)) if s.code == 422 => {
                // The gateway's own schema refused it: a policy its API cannot take.
                return Ok(Some(Generated::failed(
                    "GatewayObjectInvalid",
                    format!("{kind} {object_name}: {}", s.message),
                )));
            }
            Err(e) => return Err(e.into()),
        }
        ctx.metrics.wrote(&kind.to_lowercase());
        written.push(format!("{kind} {object_name}"));
    }
    prune(ctx, policy, namespace, owner, &keep).await?;
    if detected.kind == GatewayKind::Envoy {
        // Back to plain Envoy: the earlier kind's objects are gone, the ConfigMap is all.
        return Ok(None);
    }
    if !written.is_empty() {
        publish(
            ctx,
            policy,
            EventType::Normal,
            "GatewayConfigApplied",
            format!("wrote {}", written.join(", ")),
        )
        .await;
    }
    let mut names: Vec<String> = keep.iter().map(|(k, n)| format!("{k} {n}")).collect();
    names.sort();
    Ok(Some(Generated::gateway(detected.kind, &names)))
}

fn missing_api(kind: &str, group: &str) -> Generated {
    Generated::failed(
        "GatewayApiMissing",
        format!("the API server does not serve {kind} ({group}): install the gateway's CRDs"),
    )
}

/// Deletes the policy's objects of every gateway kind that it does not render now.
async fn prune(
    ctx: &Context,
    policy: &VirusScanPolicy,
    namespace: &str,
    owner: &OwnerReference,
    keep: &BTreeSet<(String, String)>,
) -> Result<(), Error> {
    let selector = format!("{POLICY_LABEL}={}", policy.name_any());
    for (group, version, kind, plural) in KINDS {
        let api: Api<DynamicObject> = Api::namespaced_with(
            ctx.client.clone(),
            namespace,
            &resource(group, version, kind, plural),
        );
        let list = match api.list(&ListParams::default().labels(&selector)).await {
            Ok(l) => l,
            Err(e) if not_found(&e) => continue,
            Err(e) => return Err(e.into()),
        };
        for object in list {
            let object_name = object.name_any();
            let ours = object.owner_references().iter().any(|r| r.uid == owner.uid);
            if !ours || keep.contains(&(kind.to_owned(), object_name.clone())) {
                continue;
            }
            match api.delete(&object_name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(e.into()),
            }
            ctx.metrics.wrote("delete");
        }
    }
    Ok(())
}
