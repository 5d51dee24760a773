//! Istio gateways: one EnvoyFilter (networking.istio.io/v1alpha3) for the policy's pods.
//! Patches, all in the GATEWAY context: the producer cluster added (TCP loopback or the
//! Unix socket, as the sidecar serves it), the ext_proc filter inserted before the router
//! of every HTTP connection manager, the path handling that keeps opt-outs from being
//! fooled set on those connection managers, in Buffered mode the listeners' buffer limit
//! raised to the largest body, and `ExtProcPerRoute { disabled: true }` merged into each
//! opted-out route by its name (a VirtualService's `http[].name`).

use serde_json::{Value, json};

use super::{RenderError, object};
use crate::crd::VirusScanPolicySpec;
use crate::envoy;

pub const GROUP: &str = "networking.istio.io";
pub const API_VERSION: &str = "networking.istio.io/v1alpha3";
const HCM: &str = "envoy.filters.network.http_connection_manager";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER: &str = "envoy.filters.http.router";

pub fn envoy_filter_name(policy: &str) -> String {
    format!("vsp-{policy}")
}

/// The ext_proc filter of plain Envoy, failing closed whatever the policy says: Istio's
/// gateway must refuse a body when the producer is down, slow or unreachable.
/// `scan.failureMode: FailOpen` still lets the producer pass a body whose scan failed.
pub fn ext_proc_filter(spec: &VirusScanPolicySpec) -> Value {
    let mut filter = envoy::ext_proc_filter(spec);
    filter["typed_config"]["failure_mode_allow"] = json!(false);
    filter
}

pub fn render(
    policy: &str,
    namespace: &str,
    spec: &VirusScanPolicySpec,
) -> Result<Vec<Value>, RenderError> {
    if spec
        .selector
        .match_expressions
        .as_ref()
        .is_some_and(|e| !e.is_empty())
    {
        return Err(RenderError::SelectorNotLabels);
    }
    let labels = spec.selector.match_labels.clone().unwrap_or_default();
    let hcm_match = json!({
        "context": "GATEWAY",
        "listener": { "filterChain": { "filter": { "name": HCM } } }
    });
    let mut patches = vec![
        json!({
            "applyTo": "CLUSTER",
            "match": { "context": "GATEWAY" },
            "patch": { "operation": "ADD", "value": envoy::producer_cluster(spec) }
        }),
        json!({
            "applyTo": "HTTP_FILTER",
            "match": {
                "context": "GATEWAY",
                "listener": { "filterChain": { "filter": {
                    "name": HCM,
                    "subFilter": { "name": ROUTER }
                }}}
            },
            "patch": { "operation": "INSERT_BEFORE", "value": ext_proc_filter(spec) }
        }),
        json!({
            "applyTo": "NETWORK_FILTER",
            "match": hcm_match,
            "patch": { "operation": "MERGE", "value": { "typed_config": {
                "@type": HCM_TYPE,
                "normalize_path": true,
                "merge_slashes": true,
                "path_with_escaped_slashes_action": envoy::ESCAPED_SLASHES_ACTION
            }}}
        }),
    ];
    if let Some(limit) = envoy::buffer_limit_bytes(spec) {
        patches.push(json!({
            "applyTo": "LISTENER",
            "match": { "context": "GATEWAY" },
            "patch": { "operation": "MERGE", "value": { "per_connection_buffer_limit_bytes": limit } }
        }));
    }
    for route in &spec.routes {
        patches.push(json!({
            "applyTo": "HTTP_ROUTE",
            "match": {
                "context": "GATEWAY",
                "routeConfiguration": { "vhost": { "route": { "name": route.name } } }
            },
            "patch": {
                "operation": "MERGE",
                "value": { "typed_per_filter_config": envoy::disabled_override() }
            }
        }));
    }
    let mut filter_spec = json!({ "configPatches": patches });
    if !labels.is_empty() {
        filter_spec["workloadSelector"] = json!({ "labels": labels });
    }
    Ok(vec![object(
        API_VERSION,
        "EnvoyFilter",
        &envoy_filter_name(policy),
        namespace,
        filter_spec,
    )])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: Value) -> VirusScanPolicySpec {
        serde_json::from_value(json).expect("spec")
    }

    fn patches(objects: &[Value]) -> &Vec<Value> {
        objects[0]["spec"]["configPatches"]
            .as_array()
            .expect("patches")
    }

    #[test]
    fn envoy_filter_inserts_ext_proc_before_the_router_and_fails_closed() {
        let s = spec(json!({
            "selector": {"matchLabels": {"istio": "ingressgateway"}},
            "scan": {"failureMode": "FailOpen"},
            "routes": [{"name": "health", "path": "/healthz"}]
        }));
        let objects = render("gw", "t", &s).expect("render");
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0]["kind"], "EnvoyFilter");
        assert_eq!(
            objects[0]["spec"]["workloadSelector"]["labels"]["istio"],
            "ingressgateway"
        );
        let p = patches(&objects);
        assert!(p.iter().all(|p| p["match"]["context"] == "GATEWAY"));
        let cluster = &p[0]["patch"]["value"];
        assert_eq!(cluster["name"], envoy::PRODUCER_CLUSTER);
        assert_eq!(
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
                ["address"],
            "127.0.0.1"
        );
        assert_eq!(p[1]["applyTo"], "HTTP_FILTER");
        assert_eq!(p[1]["patch"]["operation"], "INSERT_BEFORE");
        assert_eq!(
            p[1]["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"],
            ROUTER
        );
        let filter = &p[1]["patch"]["value"];
        assert_eq!(filter["name"], envoy::EXT_PROC_FILTER);
        assert_eq!(filter["typed_config"]["failure_mode_allow"], false);
        assert_eq!(
            p[2]["patch"]["value"]["typed_config"]["normalize_path"],
            true
        );
        assert_eq!(p[3]["applyTo"], "LISTENER");
        let route = &p[4];
        assert_eq!(route["applyTo"], "HTTP_ROUTE");
        assert_eq!(
            route["match"]["routeConfiguration"]["vhost"]["route"]["name"],
            "health"
        );
        assert_eq!(
            route["patch"]["value"]["typed_per_filter_config"][envoy::EXT_PROC_FILTER]["disabled"],
            true
        );
    }

    #[test]
    fn match_expressions_cannot_become_a_workload_selector() {
        let s = spec(json!({"selector": {"matchExpressions": [
            {"key": "app", "operator": "In", "values": ["a", "b"]}
        ]}}));
        assert_eq!(render("gw", "t", &s), Err(RenderError::SelectorNotLabels));
    }
}
