//! The gateway a policy protects, and the objects its API takes. Which gateway runs the
//! selected pods is `spec.gateway`, or derived from their labels ([`detect`]); the
//! renderers for Envoy Gateway ([`envoy_gateway`]) and Istio ([`istio`]) are pure functions
//! of the policy that reuse the ext_proc filter, producer cluster and route opt-outs
//! [`crate::envoy`] renders for plain Envoy. Every object they render fails closed.

pub mod envoy_gateway;
pub mod istio;

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::crd::{GatewayKind, VirusScanPolicySpec};

/// Label Envoy Gateway puts on the proxies of a Gateway: the Gateway's name.
pub const EG_OWNING_GATEWAY_NAME: &str = "gateway.envoyproxy.io/owning-gateway-name";
/// Label Envoy Gateway puts on the proxies of a Gateway: the Gateway's namespace.
pub const EG_OWNING_GATEWAY_NAMESPACE: &str = "gateway.envoyproxy.io/owning-gateway-namespace";

/// Why the policy's objects cannot be rendered for its gateway: the tenant's to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error(
        "no Gateway to attach to: set spec.envoyGateway.gatewayName, or select the proxies by label {EG_OWNING_GATEWAY_NAME}"
    )]
    NoGatewayName,
    #[error(
        "Envoy Gateway reaches the producer only through its Unix socket (it refuses loopback backends): set spec.producer.transport: UnixSocket"
    )]
    NotUnixSocket,
    #[error(
        "an EnvoyFilter's workloadSelector takes labels only: the selector's matchExpressions cannot be expressed; use matchLabels"
    )]
    SelectorNotLabels,
}

impl RenderError {
    /// The condition reason.
    pub fn reason(&self) -> &'static str {
        match self {
            RenderError::NoGatewayName => "GatewayNameUnknown",
            RenderError::NotUnixSocket => "TransportUnsupported",
            RenderError::SelectorNotLabels => "SelectorUnsupported",
        }
    }
}

/// The gateway kind in force and why, for the `Gateway` condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub kind: GatewayKind,
    pub reason: &'static str,
    pub message: String,
}

/// Which labels of a pod (or a selector) say which gateway runs it.
fn kind_of_labels(labels: &BTreeMap<String, String>) -> Option<(GatewayKind, String)> {
    if let Some(name) = labels.get(EG_OWNING_GATEWAY_NAME) {
        return Some((
            GatewayKind::EnvoyGateway,
            format!("label {EG_OWNING_GATEWAY_NAME}={name}"),
        ));
    }
    if let Some(v) = labels
        .get("istio")
        .filter(|v| matches!(v.as_str(), "ingressgateway" | "egressgateway"))
    {
        return Some((GatewayKind::Istio, format!("label istio={v}")));
    }
    for key in [
        "service.istio.io/canonical-name",
        "gateway.istio.io/managed",
        "sidecar.istio.io/inject",
    ] {
        if let Some(v) = labels.get(key) {
            return Some((GatewayKind::Istio, format!("label {key}={v}")));
        }
    }
    None
}

/// `spec.gateway`, or else the kind the selector's labels name, or else the kind the
/// selected pods' labels name (the first pod that names one), or else plain Envoy.
pub fn detect<'a>(
    spec: &VirusScanPolicySpec,
    pods: impl IntoIterator<Item = &'a BTreeMap<String, String>>,
) -> Detected {
    if let Some(kind) = spec.gateway {
        return Detected {
            kind,
            reason: "Specified",
            message: format!("spec.gateway is {kind:?}"),
        };
    }
    let from = |kind: GatewayKind, why: String, whose: &str| Detected {
        kind,
        reason: match kind {
            GatewayKind::EnvoyGateway => "EnvoyGatewayLabels",
            GatewayKind::Istio => "IstioLabels",
            GatewayKind::Envoy => "NoGatewayLabels",
        },
        message: format!("{kind:?}: {whose} {why}"),
    };
    if let Some((kind, why)) = spec.selector.match_labels.as_ref().and_then(kind_of_labels) {
        return from(kind, why, "the selector requires");
    }
    if let Some((kind, why)) = pods.into_iter().find_map(kind_of_labels) {
        return from(kind, why, "a selected pod has");
    }
    Detected {
        kind: GatewayKind::Envoy,
        reason: "NoGatewayLabels",
        message:
            "Envoy: neither the selector nor a selected pod carries Envoy Gateway or Istio labels"
                .to_owned(),
    }
}

/// A namespaced object of the policy's (the controller adds its labels and owner).
pub(crate) fn object(
    api_version: &str,
    kind: &str,
    name: &str,
    namespace: &str,
    spec: Value,
) -> Value {
    json!({
        "apiVersion": api_version,
        "kind": kind,
        "metadata": { "name": name, "namespace": namespace },
        "spec": spec
    })
}

/// A short, stable, DNS-safe suffix for an object per opted-out route: route names are free
/// text, object names are not.
pub(crate) fn route_suffix(route: &str) -> String {
    hex::encode(&Sha256::digest(route.as_bytes())[..5])
}

/// Every object for `kind`: empty for plain Envoy, whose configuration is the ConfigMap.
pub fn render(
    kind: GatewayKind,
    policy: &str,
    namespace: &str,
    spec: &VirusScanPolicySpec,
) -> Result<Vec<Value>, RenderError> {
    match kind {
        GatewayKind::Envoy => Ok(Vec::new()),
        GatewayKind::EnvoyGateway => envoy_gateway::render(policy, namespace, spec),
        GatewayKind::Istio => istio::render(policy, namespace, spec),
    }
}

/// The kinds of object any renderer writes, as (group, version, kind, plural), so that the
/// controller can find and remove what a policy no longer needs.
pub const KINDS: [(&str, &str, &str, &str); 4] = [
    (
        envoy_gateway::GROUP,
        "v1alpha1",
        "EnvoyExtensionPolicy",
        "envoyextensionpolicies",
    ),
    (envoy_gateway::GROUP, "v1alpha1", "Backend", "backends"),
    (
        envoy_gateway::GROUP,
        "v1alpha1",
        "ClientTrafficPolicy",
        "clienttrafficpolicies",
    ),
    (istio::GROUP, "v1alpha3", "EnvoyFilter", "envoyfilters"),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: Value) -> VirusScanPolicySpec {
        serde_json::from_value(json).expect("spec")
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn gateway_kind_is_derived_from_the_selector_then_the_pods() {
        let eg = spec(json!({"selector": {"matchLabels": {EG_OWNING_GATEWAY_NAME: "web"}}}));
        let d = detect(&eg, []);
        assert_eq!(
            (d.kind, d.reason),
            (GatewayKind::EnvoyGateway, "EnvoyGatewayLabels")
        );
        let plain = spec(json!({"selector": {"matchLabels": {"app": "gw"}}}));
        let istio_pod = labels(&[("app", "gw"), ("istio", "ingressgateway")]);
        let d = detect(&plain, [&istio_pod]);
        assert_eq!((d.kind, d.reason), (GatewayKind::Istio, "IstioLabels"));
        assert!(d.message.contains("istio=ingressgateway"), "{}", d.message);
        let injected = labels(&[("sidecar.istio.io/inject", "true")]);
        assert_eq!(detect(&plain, [&injected]).kind, GatewayKind::Istio);
        let d = detect(&plain, [&labels(&[("app", "gw")])]);
        assert_eq!((d.kind, d.reason), (GatewayKind::Envoy, "NoGatewayLabels"));
        let pinned = spec(json!({"selector": {}, "gateway": "Envoy"}));
        let d = detect(&pinned, [&istio_pod]);
        assert_eq!((d.kind, d.reason), (GatewayKind::Envoy, "Specified"));
    }

    #[test]
    fn route_suffixes_are_dns_safe_and_distinct() {
        let a = route_suffix("Health Check/ä");
        assert_eq!(a.len(), 10);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_uppercase())
        );
        assert_ne!(a, route_suffix("health"));
    }
}
