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

/// What another EnvoyFilter does that can take a gateway's bodies past the policy's filter,
/// if anything. Of the patches Istio applies to gateways (context `GATEWAY` or `ANY`): one
/// that removes or replaces the ext_proc filter (or every HTTP filter), the connection
/// manager, the filter chain or the listener that carry it; a merge that brings its own
/// list of HTTP filters or filter chains; anything that configures ext_proc itself (a
/// per-route `disabled: true`, another processing mode). Istio reports nothing on an
/// EnvoyFilter, so this is read from its patches.
pub fn interference(spec: &Value) -> Option<String> {
    let patches = spec.get("configPatches")?.as_array()?;
    let mut found = Vec::new();
    for p in patches {
        let context = p["match"]["context"].as_str().unwrap_or("ANY");
        if !matches!(context, "ANY" | "GATEWAY") {
            continue;
        }
        let apply_to = p["applyTo"].as_str().unwrap_or("");
        let operation = p["patch"]["operation"].as_str().unwrap_or("");
        let value = &p["patch"]["value"];
        // Istio reads patch values as protobuf JSON: `http_filters` and `httpFilters` alike.
        let text = value.to_string().to_ascii_lowercase().replace('_', "");
        let filter = &p["match"]["listener"]["filterChain"]["filter"];
        let removes = matches!(operation, "REMOVE" | "REPLACE");
        // Another HTTP filter (another ext_proc too) or a cluster beside ours takes nothing
        // away; anything else that sets ext_proc can turn ours off (a route's or a virtual
        // host's `typed_per_filter_config` is keyed by the filter's name, so it is ours too,
        // and a route inserted first can carry it).
        let adds_filter = matches!(apply_to, "HTTP_FILTER" | "CLUSTER")
            && (operation.starts_with("INSERT") || operation == "ADD");
        let what = if !adds_filter && text.contains("extproc") {
            Some(format!("configures ext_proc ({apply_to} {operation})"))
        } else {
            match apply_to {
                // Istio skips a REMOVE or REPLACE that names no filter. A merge may rename
                // the filter (so that a later patch removes it under another name), and
                // without the router ours is never inserted.
                "HTTP_FILTER" if !adds_filter => {
                    let sub = filter["subFilter"]["name"].as_str();
                    sub.filter(|n| *n == envoy::EXT_PROC_FILTER || *n == ROUTER)
                        .map(|n| format!("{operation}s {n}"))
                }
                "NETWORK_FILTER" if removes => (filter["name"].as_str() == Some(HCM))
                    .then(|| format!("{operation}s the HTTP connection manager")),
                "NETWORK_FILTER" | "LISTENER" | "FILTER_CHAIN"
                    if operation == "MERGE"
                        && (text.contains("httpfilters")
                            || text.contains("filterchains")
                            || (apply_to == "NETWORK_FILTER" && value.get("name").is_some())) =>
                {
                    Some(format!(
                        "merges its own filters or names into the {apply_to}"
                    ))
                }
                "LISTENER" | "FILTER_CHAIN" if removes => {
                    Some(format!("{operation}s a {apply_to}"))
                }
                // Added after every other patch: ours is not inserted into it.
                "LISTENER" | "FILTER_CHAIN" if operation == "ADD" => Some(format!(
                    "ADDs a {apply_to}, which carries no ext_proc of ours"
                )),
                _ => None,
            }
        };
        if let Some(what) = what
            && !found.contains(&what)
        {
            found.push(what);
        }
    }
    (!found.is_empty()).then(|| found.join(", "))
}

/// Whether an EnvoyFilter applies to a pod with these labels: its `workloadSelector`, or its
/// `targetRefs` (a Gateway by the `gateway.networking.k8s.io/gateway-name` label; any other
/// kind is taken to apply), or every workload of its namespace without either.
pub fn applies_to(spec: &Value, labels: &std::collections::BTreeMap<String, String>) -> bool {
    if let Some(selector) = spec["workloadSelector"]["labels"].as_object() {
        return selector.iter().all(|(k, v)| {
            v.as_str()
                .is_some_and(|v| labels.get(k).map(String::as_str) == Some(v))
        });
    }
    if let Some(refs) = spec["targetRefs"].as_array().filter(|r| !r.is_empty()) {
        return refs.iter().any(|r| match r["kind"].as_str() {
            Some("Gateway") => {
                labels
                    .get("gateway.networking.k8s.io/gateway-name")
                    .map(String::as_str)
                    == r["name"].as_str()
            }
            _ => true,
        });
    }
    true
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

    #[test]
    fn envoy_filters_that_can_take_bodies_past_ext_proc_are_named_and_others_are_not() {
        // Another policy's filter on the same pods: its ext_proc beside ours is no override,
        // its opt-out (keyed by the filter's name, so ours too) is.
        let plain = render(
            "p",
            "t",
            &spec(json!({"selector": {"matchLabels": {"istio": "ingressgateway"}}})),
        )
        .unwrap();
        assert_eq!(interference(&plain[0]["spec"]), None, "{}", plain[0]);
        let opting_out = render("p", "t", &spec(json!({"selector": {"matchLabels": {"istio": "ingressgateway"}}, "routes": [{"name": "health", "path": "/healthz"}]})))
            .unwrap();
        assert_eq!(
            interference(&opting_out[0]["spec"]).as_deref(),
            Some("configures ext_proc (HTTP_ROUTE MERGE)")
        );
        let patch = |p: Value| json!({ "configPatches": [p] });
        let harmful = [
            json!({"applyTo": "HTTP_FILTER", "match": {"context": "GATEWAY", "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": "envoy.filters.http.ext_proc"}}}}}, "patch": {"operation": "REMOVE"}}),
            json!({"applyTo": "HTTP_FILTER", "match": {"context": "GATEWAY", "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": "envoy.filters.http.ext_proc"}}}}}, "patch": {"operation": "MERGE", "value": {"name": "renamed"}}}),
            json!({"applyTo": "HTTP_FILTER", "match": {"context": "GATEWAY", "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}}, "patch": {"operation": "REPLACE", "value": {"name": "other.router"}}}),
            json!({"applyTo": "HTTP_ROUTE", "match": {"context": "GATEWAY"}, "patch": {"operation": "INSERT_FIRST", "value": {"match": {"prefix": "/"}, "typed_per_filter_config": {"envoy.filters.http.ext_proc": {"disabled": true}}}}}),
            json!({"applyTo": "VIRTUAL_HOST", "match": {"context": "GATEWAY"}, "patch": {"operation": "ADD", "value": {"name": "v", "typed_per_filter_config": {"envoy.filters.http.ext_proc": {"disabled": true}}}}}),
            json!({"applyTo": "FILTER_CHAIN", "match": {"context": "GATEWAY"}, "patch": {"operation": "ADD", "value": {}}}),
            json!({"applyTo": "LISTENER", "match": {"context": "ANY"}, "patch": {"operation": "ADD", "value": {}}}),
            json!({"applyTo": "NETWORK_FILTER", "match": {"context": "GATEWAY"}, "patch": {"operation": "MERGE", "value": {"typedConfig": {"httpFilters": [{"name": ROUTER}]}}}}),
            json!({"applyTo": "HTTP_ROUTE", "match": {"context": "GATEWAY"}, "patch": {"operation": "MERGE", "value": {"typed_per_filter_config": {"envoy.filters.http.ext_proc": {"@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute", "disabled": true}}}}}),
            json!({"applyTo": "NETWORK_FILTER", "match": {"listener": {"filterChain": {"filter": {"name": HCM}}}}, "patch": {"operation": "REPLACE", "value": {}}}),
            json!({"applyTo": "NETWORK_FILTER", "match": {"context": "GATEWAY"}, "patch": {"operation": "MERGE", "value": {"typed_config": {"http_filters": [{"name": ROUTER}]}}}}),
            json!({"applyTo": "LISTENER", "match": {"context": "GATEWAY"}, "patch": {"operation": "REMOVE"}}),
            json!({"applyTo": "FILTER_CHAIN", "match": {"context": "GATEWAY"}, "patch": {"operation": "REPLACE", "value": {}}}),
        ];
        for p in harmful {
            assert!(interference(&patch(p.clone())).is_some(), "{p}");
        }
        let harmless = [
            // Another filter removed, a Lua filter added, sidecars only, a listener setting.
            json!({"applyTo": "HTTP_FILTER", "match": {"context": "GATEWAY", "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": "envoy.filters.http.lua"}}}}}, "patch": {"operation": "REMOVE"}}),
            json!({"applyTo": "HTTP_FILTER", "match": {"context": "GATEWAY"}, "patch": {"operation": "INSERT_BEFORE", "value": {"name": "envoy.filters.http.lua"}}}),
            json!({"applyTo": "HTTP_FILTER", "match": {"context": "SIDECAR_INBOUND"}, "patch": {"operation": "REMOVE"}}),
            // A REMOVE that names no filter: Istio skips it.
            json!({"applyTo": "HTTP_FILTER", "match": {"context": "ANY"}, "patch": {"operation": "REMOVE"}}),
            json!({"applyTo": "CLUSTER", "match": {"context": "GATEWAY"}, "patch": {"operation": "ADD", "value": {"name": "c"}}}),
            json!({"applyTo": "LISTENER", "match": {"context": "GATEWAY"}, "patch": {"operation": "MERGE", "value": {"per_connection_buffer_limit_bytes": 1024}}}),
        ];
        for p in harmless {
            assert_eq!(interference(&patch(p.clone())), None, "{p}");
        }
    }

    #[test]
    fn an_envoy_filter_applies_by_workload_selector_target_ref_or_to_the_whole_namespace() {
        let labels: std::collections::BTreeMap<String, String> = [
            ("istio", "ingressgateway"),
            ("gateway.networking.k8s.io/gateway-name", "web"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert!(applies_to(&json!({}), &labels));
        assert!(applies_to(
            &json!({"workloadSelector": {"labels": {"istio": "ingressgateway"}}}),
            &labels
        ));
        assert!(!applies_to(
            &json!({"workloadSelector": {"labels": {"istio": "egressgateway"}}}),
            &labels
        ));
        assert!(applies_to(
            &json!({"targetRefs": [{"kind": "Gateway", "name": "web"}]}),
            &labels
        ));
        assert!(!applies_to(
            &json!({"targetRefs": [{"kind": "Gateway", "name": "other"}]}),
            &labels
        ));
        assert!(applies_to(
            &json!({"targetRefs": [{"kind": "Service", "name": "x"}]}),
            &labels
        ));
    }
}
