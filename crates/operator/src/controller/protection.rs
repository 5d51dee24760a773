//! Whether each gateway a policy selects is protected. Its selected pods are grouped by
//! workload (for Envoy Gateway, by the Gateway whose proxies they are); a gateway is
//! protected when every pod runs the sidecar this policy injects now and nothing in the
//! gateway's own API replaces the scan. Pure: the pods and the overrides come from the
//! controller.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use crate::crd::{GatewayKind, GatewayState, GatewayStatus};
use crate::gateways::EG_OWNING_GATEWAY_NAME;
use crate::inject::INJECT;

/// What a selected pod runs, against what the policy injects now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodState {
    /// The current sidecar, from the current generation.
    Injected,
    /// The sidecar the policy injects now, recorded for an older generation (the Envoy
    /// configuration it was started with may be older).
    OlderGeneration,
    /// A sidecar or an injection annotation that is not what the policy injects now.
    Mismatch,
    /// No sidecar: created before the policy, or not admitted through the injector.
    Absent,
    /// No sidecar, opted out by the pod's own annotation or label.
    OptedOut,
    /// Injected by another policy.
    OtherPolicy,
}

/// A selected pod, as the per-gateway status needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelectedPod {
    pub name: String,
    pub namespace: String,
    /// `deployment/web`, `statefulset/db`, `pod/lonely`, ...
    pub workload: String,
    /// The Envoy Gateway Gateway whose proxy this is (its owning-gateway label).
    pub eg_gateway: Option<String>,
    pub state: PodState,
}

impl SelectedPod {
    pub fn of(pod: &Pod, state: PodState) -> SelectedPod {
        SelectedPod {
            name: pod.name_any(),
            namespace: pod.namespace().unwrap_or_default(),
            workload: workload(pod),
            eg_gateway: pod.labels().get(EG_OWNING_GATEWAY_NAME).cloned(),
            state,
        }
    }
}

/// The workload a pod belongs to: a ReplicaSet's pods are its Deployment's when the
/// ReplicaSet's name is a Deployment's name and the pod's template hash.
pub(super) fn workload(pod: &Pod) -> String {
    let owner = pod
        .owner_references()
        .iter()
        .find(|o| o.controller == Some(true));
    match owner {
        Some(o) if o.kind == "ReplicaSet" => {
            let deployment = pod
                .labels()
                .get("pod-template-hash")
                .and_then(|hash| o.name.strip_suffix(&format!("-{hash}")));
            match deployment {
                Some(d) => format!("deployment/{d}"),
                None => format!("replicaset/{}", o.name),
            }
        }
        Some(o) => format!("{}/{}", o.kind.to_lowercase(), o.name),
        None => format!("pod/{}", pod.name_any()),
    }
}

/// Something that keeps a gateway's traffic (or some of it) from the scan: an override in
/// the gateway's own API (`Overridden`), or configuration that is missing (`NotConfigured`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    /// The gateway it concerns, as named in [`GatewayStatus::name`].
    pub gateway: String,
    pub state: GatewayState,
    pub message: String,
}

/// The status name of an Envoy Gateway Gateway.
pub fn eg_gateway_name(gateway: &str) -> String {
    format!("gateway/{gateway}")
}

/// Each selected gateway and its state. For Envoy Gateway the Gateway the policy attaches
/// to is listed even without pods; pods are grouped by the Gateway their owning-gateway
/// label names. Other kinds group pods by workload. `configured` is the outcome of writing
/// the policy's configuration: `Err(why)` when it is not written, and then no gateway of it
/// is protected.
pub fn gateways(
    kind: GatewayKind,
    eg_gateway: Option<&str>,
    namespace: &str,
    pods: &[SelectedPod],
    overrides: &[Override],
    configured: Result<(), &str>,
) -> Vec<GatewayStatus> {
    let mut groups: BTreeMap<String, (String, Vec<&SelectedPod>)> = BTreeMap::new();
    if kind == GatewayKind::EnvoyGateway
        && let Some(g) = eg_gateway
    {
        groups.insert(eg_gateway_name(g), (namespace.to_owned(), Vec::new()));
    }
    for pod in pods {
        let key = match (&pod.eg_gateway, kind) {
            (Some(g), GatewayKind::EnvoyGateway) => eg_gateway_name(g),
            _ => pod.workload.clone(),
        };
        let group = groups
            .entry(key)
            .or_insert_with(|| (pod.namespace.clone(), Vec::new()));
        // The namespace the proxies run in, once one is seen.
        if group.1.is_empty() {
            group.0 = pod.namespace.clone();
        }
        group.1.push(pod);
    }
    let attached = eg_gateway.map(eg_gateway_name);
    groups
        .into_iter()
        .map(|(name, (ns, pods))| {
            let mut against: Vec<(GatewayState, String)> = overrides
                .iter()
                .filter(|o| o.gateway == name)
                .map(|o| (o.state, o.message.clone()))
                .collect();
            if let Err(why) = configured {
                against.push((
                    GatewayState::NotConfigured,
                    format!("the policy's configuration is not written: {why}"),
                ));
            }
            if kind == GatewayKind::EnvoyGateway
                && name.starts_with("gateway/")
                && attached.as_deref() != Some(name.as_str())
            {
                against.push((
                    GatewayState::NotConfigured,
                    format!(
                        "proxies of a Gateway the policy does not attach to (its EnvoyExtensionPolicy targets {}): nothing sends their bodies to the producer",
                        attached.as_deref().unwrap_or("no Gateway")
                    ),
                ));
            }
            judge(name, ns, &pods, &against)
        })
        .collect()
}

fn judge(
    name: String,
    namespace: String,
    pods: &[&SelectedPod],
    against: &[(GatewayState, String)],
) -> GatewayStatus {
    let count = |f: &dyn Fn(PodState) -> bool| pods.iter().filter(|p| f(p.state)).count();
    let injected = count(&|s| matches!(s, PodState::Injected | PodState::OlderGeneration));
    let outdated = count(&|s| matches!(s, PodState::OlderGeneration | PodState::Mismatch));
    let (state, message) = if pods.is_empty() && against.is_empty() {
        (
            GatewayState::NoPods,
            "no selected pod of it exists: nothing runs unscanned, nothing is protected yet"
                .to_owned(),
        )
    } else {
        let mut reasons = Vec::new();
        let mut state = GatewayState::Protected;
        if pods.is_empty() {
            reasons.push("no selected pod of it exists".to_owned());
        }
        let without: Vec<String> = pods
            .iter()
            .filter_map(|p| {
                let why = match p.state {
                    PodState::Absent => {
                        "no sidecar: created before the policy or not admitted through the injector"
                    }
                    PodState::OptedOut => "opted out",
                    PodState::OtherPolicy => "injected by another policy",
                    _ => return None,
                };
                Some(format!("{} ({why})", p.name))
            })
            .collect();
        if !without.is_empty() {
            state = GatewayState::NotInjected;
            reasons.push(format!(
                "bodies through these pods are not scanned: {}; restart them once they can be injected, or set {INJECT}: \"false\" only where that is meant",
                list(&without)
            ));
        }
        for (graver, why) in against {
            state = state.max_severity(*graver);
            reasons.push(why.clone());
        }
        let stale: Vec<String> = pods
            .iter()
            .filter(|p| matches!(p.state, PodState::OlderGeneration | PodState::Mismatch))
            .map(|p| p.name.clone())
            .collect();
        if !stale.is_empty() {
            state = state.max_severity(GatewayState::Outdated);
            reasons.push(format!(
                "restart to run what the policy injects now: {}",
                list(&stale)
            ));
        }
        if reasons.is_empty() {
            reasons.push(format!(
                "all {} pods run the sidecar this policy injects now",
                pods.len()
            ));
        }
        (state, reasons.join("; "))
    };
    let n = |v: usize| i32::try_from(v).unwrap_or(i32::MAX);
    GatewayStatus {
        name,
        namespace,
        state,
        message,
        pods: n(pods.len()),
        injected: n(injected),
        outdated: n(outdated),
    }
}

impl GatewayState {
    /// The graver of two states: not injected, then overridden, then outdated, then
    /// protected.
    fn max_severity(self, other: GatewayState) -> GatewayState {
        let rank = |s: GatewayState| match s {
            GatewayState::NotConfigured => 5,
            GatewayState::NotInjected => 4,
            GatewayState::Overridden => 3,
            GatewayState::Outdated => 2,
            GatewayState::NoPods => 1,
            GatewayState::Protected => 0,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// At most five names, then how many more.
fn list(names: &[String]) -> String {
    let mut out = names.iter().take(5).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 5 {
        out.push_str(&format!(" and {} more", names.len() - 5));
    }
    out
}

/// `protected/selected`, for the printer column.
pub fn summary(gateways: &[GatewayStatus]) -> String {
    let protected = gateways
        .iter()
        .filter(|g| g.state == GatewayState::Protected)
        .count();
    format!("{protected}/{}", gateways.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, owner: Option<(&str, &str)>, labels: serde_json::Value) -> Pod {
        let mut p = json!({"metadata": {"name": name, "namespace": "t", "labels": labels}});
        if let Some((kind, owner)) = owner {
            p["metadata"]["ownerReferences"] = json!([{
                "apiVersion": "apps/v1", "kind": kind, "name": owner, "uid": "u", "controller": true
            }]);
        }
        serde_json::from_value(p).expect("pod")
    }

    fn selected(name: &str, workload: &str, state: PodState) -> SelectedPod {
        SelectedPod {
            name: name.to_owned(),
            namespace: "t".to_owned(),
            workload: workload.to_owned(),
            eg_gateway: None,
            state,
        }
    }

    #[test]
    fn pods_belong_to_their_deployment_or_other_owner() {
        let rs = pod(
            "web-5d9f-abcde",
            Some(("ReplicaSet", "web-5d9f")),
            json!({"pod-template-hash": "5d9f"}),
        );
        assert_eq!(workload(&rs), "deployment/web");
        let bare_rs = pod("x-1", Some(("ReplicaSet", "x")), json!({}));
        assert_eq!(workload(&bare_rs), "replicaset/x");
        let sts = pod("db-0", Some(("StatefulSet", "db")), json!({}));
        assert_eq!(workload(&sts), "statefulset/db");
        assert_eq!(workload(&pod("lonely", None, json!({}))), "pod/lonely");
    }

    #[test]
    fn each_workload_gets_its_state_and_the_gravest_reason_wins() {
        let pods = [
            selected("a-1", "deployment/a", PodState::Injected),
            selected("a-2", "deployment/a", PodState::Injected),
            selected("b-1", "deployment/b", PodState::Injected),
            selected("b-2", "deployment/b", PodState::Absent),
            selected("b-3", "deployment/b", PodState::OlderGeneration),
            selected("c-1", "deployment/c", PodState::Mismatch),
            selected("d-1", "deployment/d", PodState::OptedOut),
        ];
        let g = gateways(GatewayKind::Envoy, None, "t", &pods, &[], Ok(()));
        let by: BTreeMap<&str, &GatewayStatus> = g.iter().map(|g| (g.name.as_str(), g)).collect();
        assert_eq!(by["deployment/a"].state, GatewayState::Protected);
        assert_eq!(
            (
                by["deployment/b"].state,
                by["deployment/b"].pods,
                by["deployment/b"].injected,
                by["deployment/b"].outdated
            ),
            (GatewayState::NotInjected, 3, 2, 1)
        );
        assert!(
            by["deployment/b"].message.contains("b-2 (no sidecar"),
            "{}",
            by["deployment/b"].message
        );
        assert!(
            by["deployment/b"]
                .message
                .contains("restart to run what the policy injects now: b-3")
        );
        assert_eq!(by["deployment/c"].state, GatewayState::Outdated);
        assert_eq!(by["deployment/d"].state, GatewayState::NotInjected);
        assert!(by["deployment/d"].message.contains("d-1 (opted out)"));
        assert_eq!(summary(&g), "1/4");
    }

    #[test]
    fn an_envoy_gateway_gateway_is_listed_without_pods_and_can_be_overridden() {
        let none = gateways(
            GatewayKind::EnvoyGateway,
            Some("web"),
            "t",
            &[],
            &[],
            Ok(()),
        );
        assert_eq!(none.len(), 1);
        assert_eq!(
            (none[0].name.as_str(), none[0].state),
            ("gateway/web", GatewayState::NoPods)
        );
        assert_eq!(summary(&none), "0/1");

        let mut proxy = selected(
            "envoy-t-web-1",
            "deployment/envoy-t-web",
            PodState::Injected,
        );
        proxy.namespace = "envoy-gateway-system".to_owned();
        proxy.eg_gateway = Some("web".to_owned());
        let overrides = [Override {
            gateway: eg_gateway_name("web"),
            state: GatewayState::Overridden,
            message: "EnvoyExtensionPolicy t/mine on HTTPRoute t/shop replaces the scan there"
                .to_owned(),
        }];
        let g = gateways(
            GatewayKind::EnvoyGateway,
            Some("web"),
            "t",
            &[proxy.clone()],
            &overrides,
            Ok(()),
        );
        assert_eq!(g.len(), 1);
        assert_eq!(
            (g[0].name.as_str(), g[0].namespace.as_str(), g[0].state),
            (
                "gateway/web",
                "envoy-gateway-system",
                GatewayState::Overridden
            )
        );
        assert!(g[0].message.contains("t/mine"));
        let no_pods = gateways(
            GatewayKind::EnvoyGateway,
            Some("web"),
            "t",
            &[],
            &overrides,
            Ok(()),
        );
        assert_eq!(no_pods[0].state, GatewayState::Overridden);
        let clean = gateways(
            GatewayKind::EnvoyGateway,
            Some("web"),
            "t",
            &[proxy.clone()],
            &[],
            Ok(()),
        );
        assert_eq!(clean[0].state, GatewayState::Protected);
        assert_eq!(summary(&clean), "1/1");

        // Not protected without the configuration that sends bodies to the producer.
        let unwritten = gateways(
            GatewayKind::EnvoyGateway,
            Some("web"),
            "t",
            &[proxy.clone()],
            &[],
            Err("TransportUnsupported"),
        );
        assert_eq!(unwritten[0].state, GatewayState::NotConfigured);
        assert!(unwritten[0].message.contains("TransportUnsupported"));
        // Proxies of another Gateway the selector also matches: injected, but not attached.
        let mut other = proxy;
        other.name = "envoy-t-other-1".to_owned();
        other.eg_gateway = Some("other".to_owned());
        let g = gateways(
            GatewayKind::EnvoyGateway,
            Some("web"),
            "t",
            &[other],
            &[],
            Ok(()),
        );
        let by: BTreeMap<&str, GatewayState> =
            g.iter().map(|g| (g.name.as_str(), g.state)).collect();
        assert_eq!(by["gateway/other"], GatewayState::NotConfigured);
        assert_eq!(by["gateway/web"], GatewayState::NoPods);
    }
}
