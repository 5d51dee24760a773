//! Envoy Gateway (gateway.envoyproxy.io, v1.5 and later): an EnvoyExtensionPolicy on the
//! Gateway with the ext_proc extension, a Backend for the producer's Unix socket (Envoy
//! Gateway refuses loopback IPs as backends, and the socket is in the proxy pod's own
//! emptyDir), in Buffered mode a ClientTrafficPolicy that raises the connection buffer
//! limit to the largest body, and one EnvoyExtensionPolicy without ext_proc per opted-out
//! HTTPRoute rule: Envoy Gateway applies the most specific policy of a kind to a route, so
//! a rule's own policy replaces the Gateway's there.

use serde_json::{Value, json};

use super::{EG_OWNING_GATEWAY_NAME, RenderError, object, route_suffix};
use crate::crd::{Direction, ProcessingMode, Transport, VirusScanPolicySpec};
use crate::envoy::{self, SOCKET_PATH};

pub const GROUP: &str = "gateway.envoyproxy.io";
pub const API_VERSION: &str = "gateway.envoyproxy.io/v1alpha1";
const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";

pub fn extension_policy_name(policy: &str) -> String {
    format!("vsp-{policy}")
}

pub fn backend_name(policy: &str) -> String {
    format!("vsp-{policy}-producer")
}

pub fn client_traffic_policy_name(policy: &str) -> String {
    format!("vsp-{policy}")
}

/// The opt-out policy of one route (route names are free text: a digest names it).
pub fn opt_out_name(policy: &str, route: &str) -> String {
    format!("vsp-{policy}-skip-{}", route_suffix(route))
}

/// `spec.envoyGateway.gatewayName`, or the Gateway the selector's labels name.
pub fn gateway_name(spec: &VirusScanPolicySpec) -> Option<String> {
    spec.envoy_gateway
        .as_ref()
        .and_then(|g| g.gateway_name.clone())
        .or_else(|| {
            spec.selector
                .match_labels
                .as_ref()
                .and_then(|l| l.get(EG_OWNING_GATEWAY_NAME).cloned())
        })
}

/// The ext_proc extension: processing mode per scanned direction (a direction left out
/// sends Envoy Gateway neither headers nor body), the message timeout (Envoy Gateway's
/// default of 200 ms would fail every scan), and failOpen false whatever the policy says:
/// a producer that is down, slow or unreachable makes Envoy refuse the request (503), never
/// forward the body unscanned. `scan.failureMode: FailOpen` still lets the producer pass a
/// body whose scan failed; it never makes the gateway skip the producer.
pub fn ext_proc(policy: &str, spec: &VirusScanPolicySpec) -> Value {
    let body = match spec.scan.mode {
        ProcessingMode::Buffered => "Buffered",
        ProcessingMode::FullDuplexStreamed => "FullDuplexStreamed",
    };
    let mut mode = serde_json::Map::new();
    for (direction, key) in [
        (Direction::Request, "request"),
        (Direction::Response, "response"),
    ] {
        if spec.scan.directions.contains(&direction) {
            mode.insert(key.to_owned(), json!({ "body": body }));
        }
    }
    json!({
        "backendRefs": [{ "group": GROUP, "kind": "Backend", "name": backend_name(policy) }],
        "processingMode": mode,
        "messageTimeout": format!("{}s", envoy::message_timeout_seconds(spec)),
        "failOpen": false,
        "statusOnError": 503
    })
}

fn gateway_ref(name: &str) -> Value {
    json!({ "group": GATEWAY_API_GROUP, "kind": "Gateway", "name": name })
}

/// Every object, in the policy's namespace (the Gateway's and its HTTPRoutes').
pub fn render(
    policy: &str,
    namespace: &str,
    spec: &VirusScanPolicySpec,
) -> Result<Vec<Value>, RenderError> {
    let gateway = gateway_name(spec).ok_or(RenderError::NoGatewayName)?;
    if spec.producer.transport != Transport::UnixSocket {
        return Err(RenderError::NotUnixSocket);
    }
    let mut objects = vec![
        object(
            API_VERSION,
            "Backend",
            &backend_name(policy),
            namespace,
            json!({
                "endpoints": [{ "unix": { "path": SOCKET_PATH } }],
                "appProtocols": ["gateway.envoyproxy.io/h2c"]
            }),
        ),
        object(
            API_VERSION,
            "EnvoyExtensionPolicy",
            &extension_policy_name(policy),
            namespace,
            json!({
                "targetRefs": [gateway_ref(&gateway)],
                "extProc": [ext_proc(policy, spec)]
            }),
        ),
    ];
    if let Some(limit) = envoy::buffer_limit_bytes(spec) {
        // Envoy Gateway's default connection buffer is 32 KiB: a Buffered body past it
        // would be refused (413) before the producer saw it.
        objects.push(object(
            API_VERSION,
            "ClientTrafficPolicy",
            &client_traffic_policy_name(policy),
            namespace,
            json!({
                "targetRefs": [gateway_ref(&gateway)],
                "connection": { "bufferLimit": format!("{}Ki", limit / 1024) }
            }),
        ));
    }
    for route in &spec.routes {
        let Some(rule) = &route.http_route else {
            continue;
        };
        let mut target =
            json!({ "group": GATEWAY_API_GROUP, "kind": "HTTPRoute", "name": rule.name });
        if let Some(section) = &rule.section_name {
            target["sectionName"] = json!(section);
        }
        objects.push(object(
            API_VERSION,
            "EnvoyExtensionPolicy",
            &opt_out_name(policy, &route.name),
            namespace,
            json!({ "targetRefs": [target] }),
        ));
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: Value) -> VirusScanPolicySpec {
        serde_json::from_value(json).expect("spec")
    }

    fn eg(extra: Value) -> VirusScanPolicySpec {
        let mut base = json!({
            "selector": {"matchLabels": {EG_OWNING_GATEWAY_NAME: "web"}},
            "producer": {"transport": "UnixSocket"}
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        spec(base)
    }

    fn kinds(objects: &[Value]) -> Vec<(String, String)> {
        objects
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap_or_default().to_owned(),
                    o["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect()
    }

    #[test]
    fn buffered_policy_attaches_ext_proc_to_the_gateway_through_the_socket_and_fails_closed() {
        let objects = render("gw", "t", &eg(json!({"scan": {"maxBodyMB": 50}}))).expect("render");
        assert_eq!(
            kinds(&objects),
            [
                ("Backend".to_owned(), "vsp-gw-producer".to_owned()),
                ("EnvoyExtensionPolicy".to_owned(), "vsp-gw".to_owned()),
                ("ClientTrafficPolicy".to_owned(), "vsp-gw".to_owned()),
            ]
        );
        assert_eq!(
            objects[0]["spec"]["endpoints"][0]["unix"]["path"],
            SOCKET_PATH
        );
        let eep = &objects[1]["spec"];
        assert_eq!(eep["targetRefs"][0]["name"], "web");
        assert_eq!(eep["targetRefs"][0]["kind"], "Gateway");
        let ext = &eep["extProc"][0];
        assert_eq!(ext["failOpen"], false);
        assert_eq!(ext["messageTimeout"], "35s");
        assert_eq!(ext["processingMode"]["request"]["body"], "Buffered");
        assert_eq!(ext["processingMode"]["response"]["body"], "Buffered");
        assert_eq!(ext["backendRefs"][0]["name"], "vsp-gw-producer");
        assert_eq!(
            objects[2]["spec"]["connection"]["bufferLimit"],
            format!("{}Ki", 50 * 1024 + 64)
        );
        assert_eq!(objects[1]["metadata"]["namespace"], "t");
    }

    #[test]
    fn fail_open_policy_still_renders_fail_closed_and_streamed_needs_no_buffer() {
        let s = eg(json!({"scan": {"failureMode": "FailOpen", "directions": ["Request"]}}));
        let ext = &render("gw", "t", &s).expect("render")[1]["spec"]["extProc"][0];
        assert_eq!(ext["failOpen"], false);
        assert!(ext["processingMode"].get("response").is_none());
        let s = eg(json!({"scan": {"mode": "FullDuplexStreamed"}}));
        let objects = render("gw", "t", &s).expect("render");
        assert_eq!(objects.len(), 2, "no ClientTrafficPolicy when streamed");
        let mode = &objects[1]["spec"]["extProc"][0]["processingMode"];
        assert_eq!(mode["request"]["body"], "FullDuplexStreamed");
        assert_eq!(mode["response"]["body"], "FullDuplexStreamed");
    }

    #[test]
    fn opted_out_rules_get_a_policy_without_ext_proc() {
        let s = eg(json!({"routes": [
            {"name": "health", "path": "/healthz"},
            {"name": "assets", "httpRoute": {"name": "site", "sectionName": "static"}},
            {"name": "whole", "pathPrefix": "/x", "httpRoute": {"name": "legacy"}}
        ]}));
        let objects = render("gw", "t", &s).expect("render");
        let skips: Vec<&Value> = objects
            .iter()
            .filter(|o| {
                o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.contains("-skip-"))
            })
            .collect();
        assert_eq!(skips.len(), 2, "a path alone names no HTTPRoute rule");
        assert_eq!(
            skips[0]["metadata"]["name"],
            opt_out_name("gw", "assets").as_str()
        );
        assert_eq!(
            skips[0]["spec"],
            json!({"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "site", "sectionName": "static"}]})
        );
        assert!(
            skips[1]["spec"]["targetRefs"][0]
                .get("sectionName")
                .is_none()
        );
    }

    #[test]
    fn a_gateway_name_and_a_unix_socket_are_required() {
        let s = spec(json!({"selector": {}, "producer": {"transport": "UnixSocket"}}));
        assert_eq!(render("gw", "t", &s), Err(RenderError::NoGatewayName));
        let s = spec(json!({"selector": {}, "envoyGateway": {"gatewayName": "web"}}));
        assert_eq!(render("gw", "t", &s), Err(RenderError::NotUnixSocket));
    }
}
