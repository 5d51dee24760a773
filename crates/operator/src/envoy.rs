//! The Envoy pieces a policy stands for: the ext_proc http filter, the producer cluster,
//! the per-route opt-outs and an example bootstrap that holds them all. Pure functions of
//! the policy spec; the controller and `virus-scan-operator envoy-config` both use them.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::crd::{
    Direction, FailureMode, ProcessingMode, RouteOptOut, Transport, VirusScanPolicySpec,
};

pub const EXT_PROC_FILTER: &str = "envoy.filters.http.ext_proc";
pub const EXT_PROC_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor";
pub const EXT_PROC_PER_ROUTE_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute";
pub const PRODUCER_CLUSTER: &str = "virus_scanner_producer";
/// Where the injector mounts the socket directory when the transport is a Unix socket.
pub const SOCKET_DIR: &str = "/var/run/virus-scanner";
pub const SOCKET_PATH: &str = "/var/run/virus-scanner/producer.sock";

/// ConfigMap keys of the generated configuration.
pub const KEY_FILTER: &str = "ext-proc-filter.yaml";
pub const KEY_CLUSTER: &str = "producer-cluster.yaml";
pub const KEY_ROUTES: &str = "route-overrides.yaml";
pub const KEY_BOOTSTRAP: &str = "bootstrap.yaml";
pub const KEY_CONNECTION_MANAGER: &str = "connection-manager.yaml";

/// What an HTTP connection manager does with a path that carries escaped slashes (`%2F`,
/// `%5C`). UNESCAPE_AND_REDIRECT answers with a redirect to the unescaped, normalised path,
/// so a client ends up on the path that is routed (and scanned) as what it is, and the
/// upstream never gets a path whose meaning differs from the one Envoy routed on.
/// REJECT_REQUEST is as safe, and is accepted in a tenant's bootstrap, but answers 400 to
/// every client that escapes a slash, even where the resolved path is harmless.
pub const ESCAPED_SLASHES_ACTION: &str = "UNESCAPE_AND_REDIRECT";
/// The escaped-slash actions a tenant's bootstrap may keep (by name or enum number): both
/// route on the unescaped path or not at all.
pub const SAFE_ESCAPED_SLASHES_ACTIONS: [&str; 2] = ["UNESCAPE_AND_REDIRECT", "REJECT_REQUEST"];

/// Envoy's own margin over the producer's deadline: the producer answers 503 itself at
/// `timeoutSeconds`, Envoy's message timeout is only the backstop for a producer that hangs.
const ENVOY_TIMEOUT_MARGIN_SECONDS: u32 = 5;

/// Envoy's deadline for each answer of the producer, which answers first (at the policy's
/// timeout).
pub fn message_timeout_seconds(spec: &VirusScanPolicySpec) -> u32 {
    spec.scan.timeout_seconds + ENVOY_TIMEOUT_MARGIN_SECONDS
}

/// The ext_proc http filter, to be placed before the router.
pub fn ext_proc_filter(spec: &VirusScanPolicySpec) -> Value {
    let scan = &spec.scan;
    let full_duplex = scan.mode == ProcessingMode::FullDuplexStreamed;
    let body_mode = if full_duplex {
        "FULL_DUPLEX_STREAMED"
    } else {
        "BUFFERED"
    };
    // FULL_DUPLEX_STREAMED must see trailers, or the processor cannot tell where a body
    // without a length ends.
    let trailer_mode = if full_duplex { "SEND" } else { "SKIP" };
    let direction = |d: Direction| {
        if scan.directions.contains(&d) {
            (body_mode, trailer_mode)
        } else {
            ("NONE", "SKIP")
        }
    };
    let (request_body, request_trailer) = direction(Direction::Request);
    let (response_body, response_trailer) = direction(Direction::Response);
    let message_timeout = format!("{}s", message_timeout_seconds(spec));
    json!({
        "name": EXT_PROC_FILTER,
        "typed_config": {
            "@type": EXT_PROC_TYPE,
            "grpc_service": {
                "envoy_grpc": { "cluster_name": PRODUCER_CLUSTER },
                // The whole ext_proc stream lives as long as the HTTP exchange, large
                // uploads included; the per-message deadline is message_timeout.
                "timeout": "3600s"
            },
            // A security control fails closed: with false, a producer that is down or
            // answers with an error makes Envoy refuse the request.
            "failure_mode_allow": scan.failure_mode == FailureMode::FailOpen,
            "status_on_error": { "code": "ServiceUnavailable" },
            "message_timeout": message_timeout,
            "max_message_timeout": message_timeout,
            "allow_mode_override": false,
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SEND",
                "request_body_mode": request_body,
                "response_body_mode": response_body,
                "request_trailer_mode": request_trailer,
                "response_trailer_mode": response_trailer
            }
        }
    })
}

/// Path handling of every HTTP connection manager that carries the filter. Opted-out routes
/// are matched on the path, and without these Envoy routes on the path as the client wrote
/// it while the upstream resolves it: `/static/../upload`, `/static/%2e%2e/upload`,
/// `//static/../upload` or `/static%2F..%2Fupload` match an opted-out `/static/` prefix
/// and reach `/upload` unscanned. Normalised (RFC 3986 section 6, dot segments removed,
/// slashes merged, escaped slashes unescaped), the path routed is the path forwarded.
pub fn connection_manager_settings() -> Map<String, Value> {
    Map::from_iter([
        ("normalize_path".to_owned(), json!(true)),
        ("merge_slashes".to_owned(), json!(true)),
        (
            "path_with_escaped_slashes_action".to_owned(),
            json!(ESCAPED_SLASHES_ACTION),
        ),
    ])
}

/// The cluster that reaches the producer sidecar in the same pod.
pub fn producer_cluster(spec: &VirusScanPolicySpec) -> Value {
    let address = match spec.producer.transport {
        Transport::Tcp => json!({
            "socket_address": { "address": "127.0.0.1", "port_value": spec.producer.port }
        }),
        Transport::UnixSocket => json!({ "pipe": { "path": SOCKET_PATH } }),
    };
    json!({
        "name": PRODUCER_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": { "http2_protocol_options": {} }
            }
        },
        "load_assignment": {
            "cluster_name": PRODUCER_CLUSTER,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": address } }] }]
        }
    })
}

/// `typed_per_filter_config` that turns scanning off on one route.
pub fn disabled_override() -> Value {
    json!({
        EXT_PROC_FILTER: { "@type": EXT_PROC_PER_ROUTE_TYPE, "disabled": true }
    })
}

/// Envoy's route match for an opted-out route; none for a route named only as an HTTPRoute
/// rule (Envoy Gateway), which plain Envoy cannot match.
pub fn route_match(route: &RouteOptOut) -> Option<Value> {
    if let Some(prefix) = &route.path_prefix {
        Some(json!({ "prefix": prefix }))
    } else if let Some(path) = &route.path {
        Some(json!({ "path": path }))
    } else {
        route
            .regex
            .as_ref()
            .map(|regex| json!({ "safe_regex": { "regex": regex } }))
    }
}

/// Per opted-out route with a path match: its match and the override to merge into the
/// tenant's route.
pub fn route_overrides(spec: &VirusScanPolicySpec) -> BTreeMap<String, Value> {
    spec.routes
        .iter()
        .filter_map(|r| {
            let m = route_match(r)?;
            Some((
                r.name.clone(),
                json!({ "match": m, "typed_per_filter_config": disabled_override() }),
            ))
        })
        .collect()
}

/// Envoy buffers a BUFFERED body up to the connection's buffer limit (1 MiB by default,
/// then 413): the limit must cover the largest body the policy scans.
pub fn buffer_limit_bytes(spec: &VirusScanPolicySpec) -> Option<u64> {
    (spec.scan.mode == ProcessingMode::Buffered)
        .then(|| u64::from(spec.scan.max_body_mb) * 1024 * 1024 + 64 * 1024)
}

/// A complete bootstrap: one listener with the filter in front of an `upstream` cluster
/// (replace its address with the gateway's backend), the opted-out routes first.
pub fn example_bootstrap(spec: &VirusScanPolicySpec) -> Value {
    let mut routes: Vec<Value> = spec
        .routes
        .iter()
        .filter_map(|r| {
            Some(json!({
                "name": r.name,
                "match": route_match(r)?,
                "route": { "cluster": "upstream", "timeout": "0s" },
                "typed_per_filter_config": disabled_override()
            }))
        })
        .collect();
    routes.push(json!({
        "name": "default",
        "match": { "prefix": "/" },
        "route": { "cluster": "upstream", "timeout": "0s" }
    }));
    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway",
        "codec_type": "AUTO",
        "route_config": {
            "name": "gateway",
            "virtual_hosts": [{ "name": "all", "domains": ["*"], "routes": routes }]
        },
        "http_filters": [
            ext_proc_filter(spec),
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                }
            }
        ]
    });
    if let Some(hcm) = hcm.as_object_mut() {
        hcm.extend(connection_manager_settings());
    }
    let mut listener = json!({
        "name": "gateway",
        "address": { "socket_address": { "address": "0.0.0.0", "port_value": 8000 } },
        "filter_chains": [{ "filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": hcm
        }]}]
    });
    let mut upstream = json!({
        "name": "upstream",
        "type": "STRICT_DNS",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": "backend", "port_value": 8080 }
            }}}]}]
        }
    });
    if let Some(limit) = buffer_limit_bytes(spec) {
        listener["per_connection_buffer_limit_bytes"] = json!(limit);
        upstream["per_connection_buffer_limit_bytes"] = json!(limit);
    }
    json!({
        "static_resources": {
            "listeners": [listener],
            "clusters": [upstream, producer_cluster(spec)]
        }
    })
}

/// Generated configuration that has no YAML form; it holds what a tenant wrote.
#[derive(Debug, thiserror::Error)]
#[error("cannot render the Envoy configuration as YAML: {0}")]
pub struct RenderError(pub String);

/// Every generated piece as ConfigMap data (YAML values).
pub fn config_map_data(
    spec: &VirusScanPolicySpec,
) -> Result<BTreeMap<String, String>, RenderError> {
    Ok(BTreeMap::from([
        (KEY_FILTER.to_owned(), to_yaml(&ext_proc_filter(spec))?),
        (KEY_CLUSTER.to_owned(), to_yaml(&producer_cluster(spec))?),
        (
            KEY_CONNECTION_MANAGER.to_owned(),
            to_yaml(&Value::Object(connection_manager_settings()))?,
        ),
        (
            KEY_ROUTES.to_owned(),
            to_yaml(&json!(route_overrides(spec)))?,
        ),
        (KEY_BOOTSTRAP.to_owned(), to_yaml(&example_bootstrap(spec))?),
    ]))
}

/// The YAML form of generated configuration. What it renders holds tenant text (route
/// names and patterns, a whole tenant bootstrap), so a failure is an error, not a panic.
pub fn to_yaml(value: &Value) -> Result<String, RenderError> {
    serde_saphyr::to_string(value).map_err(|e| RenderError(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ScanSettings;

    fn spec(json: Value) -> VirusScanPolicySpec {
        serde_json::from_value(json).expect("spec")
    }

    #[test]
    fn default_policy_buffers_both_directions_and_fails_closed() {
        let f = ext_proc_filter(&spec(json!({"selector": {}})));
        let c = &f["typed_config"];
        assert_eq!(c["failure_mode_allow"], json!(false));
        assert_eq!(c["processing_mode"]["request_body_mode"], "BUFFERED");
        assert_eq!(c["processing_mode"]["response_body_mode"], "BUFFERED");
        assert_eq!(c["message_timeout"], "35s");
    }

    #[test]
    fn full_duplex_sends_trailers_and_skipped_direction_sends_no_body() {
        let s = VirusScanPolicySpec {
            scan: ScanSettings {
                mode: ProcessingMode::FullDuplexStreamed,
                directions: vec![Direction::Request],
                ..ScanSettings::default()
            },
            ..spec(json!({"selector": {}}))
        };
        let m = &ext_proc_filter(&s)["typed_config"]["processing_mode"];
        assert_eq!(m["request_body_mode"], "FULL_DUPLEX_STREAMED");
        assert_eq!(m["request_trailer_mode"], "SEND");
        assert_eq!(m["response_body_mode"], "NONE");
        assert_eq!(m["response_trailer_mode"], "SKIP");
        assert_eq!(buffer_limit_bytes(&s), None);
    }

    #[test]
    fn unix_socket_transport_uses_a_pipe() {
        let s = spec(json!({"selector": {}, "producer": {"transport": "UnixSocket"}}));
        let c = producer_cluster(&s);
        assert_eq!(
            c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
                ["path"],
            SOCKET_PATH
        );
    }

    #[test]
    fn generated_connection_managers_route_on_the_normalised_path() {
        let s =
            spec(json!({"selector": {}, "routes": [{"name": "static", "pathPrefix": "/static/"}]}));
        let b = example_bootstrap(&s);
        let hcm = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        assert_eq!(hcm["normalize_path"], true);
        assert_eq!(hcm["merge_slashes"], true);
        assert_eq!(
            hcm["path_with_escaped_slashes_action"],
            "UNESCAPE_AND_REDIRECT"
        );
        let data = config_map_data(&s).expect("data");
        let piece: Value =
            serde_saphyr::from_str(&data[KEY_CONNECTION_MANAGER]).expect("connection manager");
        assert_eq!(piece, Value::Object(connection_manager_settings()));
        assert_eq!(piece["normalize_path"], true);
    }

    #[test]
    fn opted_out_routes_come_first_in_the_example() {
        let s = spec(json!({"selector": {}, "routes": [
            {"name": "health", "path": "/healthz"},
            {"name": "static", "regex": "^/static/.*"}
        ]}));
        let b = example_bootstrap(&s);
        let routes = &b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["route_config"]["virtual_hosts"][0]["routes"];
        assert_eq!(routes[0]["match"]["path"], "/healthz");
        assert_eq!(routes[1]["match"]["safe_regex"]["regex"], "^/static/.*");
        assert_eq!(
            routes[1]["typed_per_filter_config"][EXT_PROC_FILTER]["disabled"],
            true
        );
        assert!(routes[2].get("typed_per_filter_config").is_none());
    }

    /// Route names and whole bootstraps come from tenants: text that reads as YAML syntax
    /// must come out as the same strings, and nothing a tenant writes may panic the render.
    #[test]
    fn tenant_text_that_looks_like_yaml_syntax_renders_and_reads_back() {
        for s in [
            "\u{0}",
            "\u{feff}x",
            "a\u{85}b",
            "\u{2028}",
            "!tag",
            "*alias",
            "&anchor",
            "- x",
            "? x",
            "key: value",
            "#",
            "---",
            "...",
            " lead",
            "\u{1b}[0m",
            "%YAML 1.2",
        ] {
            let v = json!({"name": s, s: [s]});
            let yaml = to_yaml(&v).expect("renders");
            let back: Value = serde_saphyr::from_str(&yaml).expect("reads back");
            assert_eq!(back, v, "{s:?}");
        }
    }

    #[test]
    fn tenant_bootstrap_nested_past_the_parser_budget_is_refused_not_rendered() {
        let deep = "[".repeat(3000) + &"]".repeat(3000);
        let err =
            crate::bootstrap::merge(&deep, &spec(json!({"selector": {}}))).expect_err("too deep");
        assert!(
            matches!(err, crate::bootstrap::MergeError::Syntax(_)),
            "{err}"
        );
    }
}
