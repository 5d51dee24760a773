//! The objects an Envoy Gateway or Istio policy takes, written by server-side apply with the
//! policy as their controller owner (deleting the policy lets the garbage collector remove
//! them), rewritten when they drift from what the policy renders, and removed when the
//! policy no longer renders them (a route opt-out dropped, the gateway kind changed).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};

use super::protection::{self, Override};
use super::status::Generated;
use super::writes::publish;
use super::{Context, MANAGED_BY, MANAGER, POLICY_LABEL};
use crate::crd::{GatewayKind, GatewayState, VirusScanPolicy};
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

const ROUTE_KINDS: [(&str, &str); 2] = [("HTTPRoute", "httproutes"), ("GRPCRoute", "grpcroutes")];

/// What keeps `gateway`'s traffic from the scan, in Envoy Gateway's own API: our
/// EnvoyExtensionPolicy missing, or refused by Envoy Gateway (`Accepted` False on one of its
/// ancestors); an older policy of the tenant's on the Gateway itself (Envoy Gateway keeps the
/// oldest); and, since Envoy Gateway applies the most specific policy of a kind, any other
/// EnvoyExtensionPolicy on a route attached to the Gateway, from whatever namespace the
/// route is in, unless it merges into ours (`mergeType`) without an `extProc` of its own
/// (a merge replaces the list). The policy's own opt-out policies are not overrides.
pub(super) async fn overrides(
    ctx: &Context,
    policy: &VirusScanPolicy,
    namespace: &str,
    owner: &OwnerReference,
    gateway: &str,
) -> Result<Vec<Override>, Error> {
    let Some(list) = extension_policies(ctx, namespace).await? else {
        return Ok(Vec::new());
    };
    let ours_name = gateways::envoy_gateway::extension_policy_name(&policy.name_any());
    let ours = list.iter().find(|p| p.name_any() == ours_name);
    let status_name = protection::eg_gateway_name(gateway);
    let found = |state: GatewayState, message: String| Override {
        gateway: status_name.clone(),
        state,
        message,
    };
    let mut out = Vec::new();
    match ours {
        None => out.push(found(
            GatewayState::NotConfigured,
            format!("EnvoyExtensionPolicy {namespace}/{ours_name} does not exist"),
        )),
        Some(ours) => {
            for refused in refused_by_envoy_gateway(ours) {
                out.push(found(
                    GatewayState::Overridden,
                    format!(
                        "Envoy Gateway does not accept EnvoyExtensionPolicy {namespace}/{ours_name}: {refused}"
                    ),
                ));
            }
        }
    }
    let foreign = |p: &&DynamicObject| {
        let merges =
            p.data["spec"].get("mergeType").is_some() && p.data["spec"].get("extProc").is_none();
        !merges && !p.owner_references().iter().any(|r| r.uid == owner.uid)
    };
    // On the Gateway itself.
    for other in list.iter().filter(foreign) {
        let older = match (
            ours.and_then(|o| o.creation_timestamp()),
            other.creation_timestamp(),
        ) {
            (Some(ours), Some(theirs)) => theirs < ours,
            _ => true,
        };
        let on_gateway = targets(&other.data["spec"])
            .iter()
            .any(|t| t.kind == "Gateway" && t.name.as_deref() == Some(gateway));
        if on_gateway && older {
            out.push(found(
                GatewayState::Overridden,
                format!(
                    "EnvoyExtensionPolicy {namespace}/{} targets Gateway {gateway} too and is older, so Envoy Gateway applies it instead of ours: bodies through the Gateway are not scanned",
                    other.name_any()
                ),
            ));
        }
    }
    // On the routes attached to it, in any namespace.
    let mut by_namespace: BTreeMap<String, Vec<DynamicObject>> = BTreeMap::new();
    by_namespace.insert(namespace.to_owned(), list);
    for (kind, route) in attached_routes(ctx, namespace, gateway).await? {
        let route_ns = route.namespace().unwrap_or_default();
        if !by_namespace.contains_key(&route_ns) {
            let theirs = extension_policies(ctx, &route_ns)
                .await?
                .unwrap_or_default();
            by_namespace.insert(route_ns.clone(), theirs);
        }
        for other in by_namespace[&route_ns].iter().filter(foreign) {
            for target in targets(&other.data["spec"]) {
                if target.kind != kind || !target.selects(&route) {
                    continue;
                }
                let section = target
                    .section
                    .as_deref()
                    .map(|s| format!(" rule {s}"))
                    .unwrap_or_default();
                out.push(found(
                    GatewayState::Overridden,
                    format!(
                        "EnvoyExtensionPolicy {route_ns}/{} on {kind} {route_ns}/{}{section} replaces ours there, so that traffic is not scanned: put our extProc into it, or remove it",
                        other.name_any(),
                        route.name_any()
                    ),
                ));
            }
        }
    }
    out.dedup();
    Ok(out)
}

/// What other EnvoyFilters do to the policy's Istio gateways: those of the policy's namespace
/// and of Istio's root namespace that apply to a selected pod and can take its bodies past
/// our filter ([`gateways::istio::interference`]), per workload. The policy's own filter is
/// not one of them.
pub(super) async fn istio_overrides(
    ctx: &Context,
    namespace: &str,
    owner: &OwnerReference,
    pods: &[k8s_openapi::api::core::v1::Pod],
) -> Result<Vec<Override>, Error> {
    let mut namespaces = vec![namespace.to_owned()];
    if let Some(root) = ctx
        .istio_root_namespace
        .as_ref()
        .filter(|r| *r != namespace)
    {
        namespaces.push(root.clone());
    }
    let mut out = Vec::new();
    for ns in namespaces {
        let api: Api<DynamicObject> = Api::namespaced_with(
            ctx.client.clone(),
            &ns,
            &resource(
                gateways::istio::GROUP,
                "v1alpha3",
                "EnvoyFilter",
                "envoyfilters",
            ),
        );
        let filters = match api.list(&ListParams::default()).await {
            Ok(l) => l.items,
            Err(e) if not_found(&e) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        let root = ns != namespace;
        for filter in filters {
            if filter.owner_references().iter().any(|r| r.uid == owner.uid) {
                continue;
            }
            let Some(what) = gateways::istio::interference(&filter.data["spec"]) else {
                continue;
            };
            for pod in pods {
                let labels = pod.labels();
                let same_namespace = pod.namespace().as_deref() == Some(ns.as_str());
                if (root || same_namespace)
                    && gateways::istio::applies_to(&filter.data["spec"], labels)
                {
                    out.push(Override {
                        gateway: protection::workload(pod),
                        state: GatewayState::Overridden,
                        message: format!(
                            "EnvoyFilter {ns}/{} {what}, so bodies through it may pass unscanned: take that patch out, or keep the gateway out of its selector",
                            filter.name_any()
                        ),
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| (&a.gateway, &a.message).cmp(&(&b.gateway, &b.message)));
    out.dedup();
    Ok(out)
}

/// The EnvoyExtensionPolicies of a namespace; `None` where the API server does not serve the
/// kind.
async fn extension_policies(
    ctx: &Context,
    namespace: &str,
) -> Result<Option<Vec<DynamicObject>>, Error> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        ctx.client.clone(),
        namespace,
        &resource(
            gateways::envoy_gateway::GROUP,
            "v1alpha1",
            "EnvoyExtensionPolicy",
            "envoyextensionpolicies",
        ),
    );
    match api.list(&ListParams::default()).await {
        Ok(l) => Ok(Some(l.items)),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// A target of an Envoy Gateway policy: by name (`targetRef`, `targetRefs`) or by labels
/// (`targetSelectors`).
struct Target {
    kind: String,
    name: Option<String>,
    labels: Option<serde_json::Map<String, serde_json::Value>>,
    section: Option<String>,
}

impl Target {
    fn selects(&self, object: &DynamicObject) -> bool {
        if let Some(name) = &self.name {
            return object.name_any() == *name;
        }
        let labels = object.labels();
        self.labels.as_ref().is_some_and(|want| {
            want.iter().all(|(k, v)| {
                v.as_str()
                    .is_some_and(|v| labels.get(k).map(String::as_str) == Some(v))
            })
        })
    }
}

fn targets(spec: &serde_json::Value) -> Vec<Target> {
    let by_name = |t: &serde_json::Value| {
        Some(Target {
            kind: t["kind"].as_str()?.to_owned(),
            name: Some(t["name"].as_str()?.to_owned()),
            labels: None,
            section: t["sectionName"].as_str().map(str::to_owned),
        })
    };
    let mut out: Vec<Target> = spec
        .get("targetRef")
        .and_then(by_name)
        .into_iter()
        .collect();
    if let Some(refs) = spec["targetRefs"].as_array() {
        out.extend(refs.iter().filter_map(by_name));
    }
    if let Some(selectors) = spec["targetSelectors"].as_array() {
        out.extend(selectors.iter().filter_map(|s| {
            Some(Target {
                kind: s["kind"].as_str()?.to_owned(),
                name: None,
                labels: Some(s["matchLabels"].as_object().cloned().unwrap_or_default()),
                section: None,
            })
        }));
    }
    out
}

/// Whether a route's `parentRefs` name the Gateway of `namespace` (a parent without a
/// namespace is in the route's own).
fn attached_to(route: &DynamicObject, namespace: &str, gateway: &str) -> bool {
    let own = route.namespace().unwrap_or_default();
    route.data["spec"]["parentRefs"]
        .as_array()
        .is_some_and(|parents| {
            parents.iter().any(|p| {
                p["name"].as_str() == Some(gateway)
                    && p["kind"].as_str().is_none_or(|k| k == "Gateway")
                    && p["namespace"].as_str().unwrap_or(own.as_str()) == namespace
            })
        })
}

/// The HTTPRoutes and GRPCRoutes of every namespace attached to the Gateway: a route in
/// another namespace may attach to it where the listener allows.
async fn attached_routes(
    ctx: &Context,
    namespace: &str,
    gateway: &str,
) -> Result<Vec<(String, DynamicObject)>, Error> {
    let mut out = Vec::new();
    for (kind, plural) in ROUTE_KINDS {
        let api: Api<DynamicObject> = Api::all_with(
            ctx.client.clone(),
            &resource("gateway.networking.k8s.io", "v1", kind, plural),
        );
        match api.list(&ListParams::default()).await {
            Ok(l) => out.extend(
                l.items
                    .into_iter()
                    .filter(|r| attached_to(r, namespace, gateway))
                    .map(|r| (kind.to_owned(), r)),
            ),
            Err(e) if not_found(&e) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Envoy Gateway's refusals of a policy: `Accepted` False on any of its ancestors.
fn refused_by_envoy_gateway(policy: &DynamicObject) -> Vec<String> {
    let mut out = Vec::new();
    for ancestor in policy.data["status"]["ancestors"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for c in ancestor["conditions"].as_array().into_iter().flatten() {
            if c["type"] == "Accepted" && c["status"] == "False" {
                out.push(format!(
                    "{} ({})",
                    c["message"].as_str().unwrap_or_default(),
                    c["reason"].as_str().unwrap_or_default()
                ));
            }
        }
    }
    out
}
