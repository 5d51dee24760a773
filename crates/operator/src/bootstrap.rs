//! Bootstrap merge: the tenant's own Envoy bootstrap with the policy's pieces put in. The
//! ext_proc filter goes before the router of every HTTP connection manager (and of every
//! per-upgrade filter chain), each connection manager normalises paths, the producer cluster
//! is added (or replaced), and each tenant route that a policy route names (by route name,
//! or by the same prefix, path or regex) gets the `disabled` override. Merging twice gives
//! the same result, so the derived bootstrap can be regenerated at will.

use serde_json::{Value, json};

use crate::crd::{Direction, RouteOptOut, VirusScanPolicySpec};
use crate::envoy::{self, EXT_PROC_FILTER, PRODUCER_CLUSTER};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MergeError {
    #[error("the bootstrap is not valid YAML or JSON: {0}")]
    Syntax(String),
    #[error("the bootstrap has no static_resources.listeners")]
    NoListeners,
    #[error("listener {listener:?}: an HTTP connection manager has no router filter")]
    NoRouter { listener: String },
    #[error(
        "listener {listener:?}: the filters of upgrade {upgrade:?} have no router filter to put the scanner before"
    )]
    UpgradeWithoutRouter { listener: String, upgrade: String },
    #[error(
        "listener {listener:?}: an HTTP connection manager sets {field}: {value}; paths must be normalised ({expected}, or leave it out), or a path that only looks like an opted-out route skips the scan"
    )]
    PathNotNormalised {
        listener: String,
        field: &'static str,
        value: String,
        expected: String,
    },
    #[error(
        "listener {listener:?} takes its routes from RDS: opted-out routes cannot be applied to it"
    )]
    RoutesFromRds { listener: String },
    #[error("the bootstrap has no HTTP connection manager to put the filter in")]
    NoHttpConnectionManager,
}

/// What a merge changed, for the policy's status and events.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    pub connection_managers: usize,
    pub routes: usize,
    /// Names of tenant routes (or `<virtual host>[index]`) given the override.
    pub disabled_routes: Vec<String>,
    /// Policy routes that matched no tenant route.
    pub unmatched_opt_outs: Vec<String>,
}

/// Merges the policy into a tenant bootstrap (YAML or JSON) and returns the derived one.
pub fn merge(tenant: &str, spec: &VirusScanPolicySpec) -> Result<(Value, MergeReport), MergeError> {
    let mut root: Value =
        serde_saphyr::from_str(tenant).map_err(|e| MergeError::Syntax(e.to_string()))?;
    let mut report = MergeReport::default();
    let mut matched = vec![false; spec.routes.len()];
    let filter = envoy::ext_proc_filter(spec);
    let buffer_limit = envoy::buffer_limit_bytes(spec);

    let listeners = root
        .pointer_mut("/static_resources/listeners")
        .and_then(Value::as_array_mut)
        .ok_or(MergeError::NoListeners)?;
    for listener in listeners.iter_mut() {
        let name = listener["name"].as_str().unwrap_or("<unnamed>").to_owned();
        let mut filtered = 0;
        let chains = listener
            .get_mut("filter_chains")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten();
        for chain in chains {
            filtered += merge_chain(chain, spec, &filter, &mut matched, &mut report, &name)?;
        }
        if let Some(chain) = listener.get_mut("default_filter_chain") {
            filtered += merge_chain(chain, spec, &filter, &mut matched, &mut report, &name)?;
        }
        if filtered > 0
            && spec.scan.directions.contains(&Direction::Request)
            && let Some(limit) = buffer_limit
        {
            raise_buffer_limit(listener, limit);
        }
    }
    if report.connection_managers == 0 {
        return Err(MergeError::NoHttpConnectionManager);
    }

    let clusters = root
        .pointer_mut("/static_resources")
        .and_then(Value::as_object_mut)
        .map(|s| s.entry("clusters").or_insert_with(|| json!([])))
        .and_then(Value::as_array_mut);
    if let Some(clusters) = clusters {
        clusters.retain(|c| c["name"] != PRODUCER_CLUSTER);
        if spec.scan.directions.contains(&Direction::Response)
            && let Some(limit) = buffer_limit
        {
            // Envoy buffers a response up to the upstream connection's limit.
            for cluster in clusters.iter_mut() {
                raise_buffer_limit(cluster, limit);
            }
        }
        clusters.push(envoy::producer_cluster(spec));
    }

    report.unmatched_opt_outs = spec
        .routes
        .iter()
        .zip(&matched)
        .filter(|(_, m)| !**m)
        .map(|(r, _)| r.name.clone())
        .collect();
    Ok((root, report))
}

/// Merges into every HTTP connection manager of one filter chain; returns how many.
fn merge_chain(
    chain: &mut Value,
    spec: &VirusScanPolicySpec,
    filter: &Value,
    matched: &mut [bool],
    report: &mut MergeReport,
    listener: &str,
) -> Result<usize, MergeError> {
    let mut count = 0;
    for hcm in http_connection_managers(chain) {
        normalise_paths(hcm, listener)?;
        insert_filter(hcm, filter, listener)?;
        insert_upgrade_filters(hcm, filter, listener)?;
        disable_routes(hcm, &spec.routes, matched, report, listener)?;
        report.connection_managers += 1;
        count += 1;
    }
    Ok(count)
}

fn raise_buffer_limit(object: &mut Value, limit: u64) {
    let current = object["per_connection_buffer_limit_bytes"]
        .as_u64()
        .unwrap_or(0);
    if current < limit {
        object["per_connection_buffer_limit_bytes"] = json!(limit);
    }
}

fn is_http_connection_manager(filter: &Value) -> bool {
    filter["name"] == "envoy.filters.network.http_connection_manager"
        || filter["typed_config"]["@type"]
            .as_str()
            .is_some_and(|t| t.ends_with(".http_connection_manager.v3.HttpConnectionManager"))
}

fn http_connection_managers(chain: &mut Value) -> Vec<&mut Value> {
    chain
        .get_mut("filters")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten()
        .filter(|f| is_http_connection_manager(f))
        .filter_map(|f| f.get_mut("typed_config"))
        .collect()
}

fn is_router(filter: &Value) -> bool {
    filter["name"] == "envoy.filters.http.router"
        || filter["typed_config"]["@type"]
            .as_str()
            .is_some_and(|t| t.ends_with(".router.v3.Router"))
}

fn insert_filter(hcm: &mut Value, filter: &Value, listener: &str) -> Result<(), MergeError> {
    let no_router = || MergeError::NoRouter {
        listener: listener.to_owned(),
    };
    let filters = hcm
        .get_mut("http_filters")
        .and_then(Value::as_array_mut)
        .ok_or_else(no_router)?;
    filters.retain(|f| f["name"] != EXT_PROC_FILTER);
    let router = filters.iter().position(is_router).ok_or_else(no_router)?;
    filters.insert(router, filter.clone());
    Ok(())
}

/// Sets the path handling of [`envoy::connection_manager_settings`] where the tenant left it
/// out; a tenant value that lets the routed path differ from the forwarded one is refused.
fn normalise_paths(hcm: &mut Value, listener: &str) -> Result<(), MergeError> {
    let refuse = |field: &'static str, value: &Value, expected: String| {
        Err(MergeError::PathNotNormalised {
            listener: listener.to_owned(),
            field,
            value: value.to_string(),
            expected,
        })
    };
    for field in ["normalize_path", "merge_slashes"] {
        match &hcm[field] {
            Value::Null | Value::Bool(true) => {}
            other => return refuse(field, other, "true".to_owned()),
        }
    }
    let field = "path_with_escaped_slashes_action";
    let action = &hcm[field];
    let safe = match action {
        Value::Null => true,
        Value::String(name) => envoy::SAFE_ESCAPED_SLASHES_ACTIONS.contains(&name.as_str()),
        // The enum's numbers: REJECT_REQUEST = 2, UNESCAPE_AND_REDIRECT = 3.
        Value::Number(n) => matches!(n.as_u64(), Some(2 | 3)),
        _ => false,
    };
    if !safe {
        return refuse(
            field,
            action,
            envoy::SAFE_ESCAPED_SLASHES_ACTIONS.join(" or "),
        );
    }
    if let Some(hcm) = hcm.as_object_mut() {
        for (key, value) in envoy::connection_manager_settings() {
            hcm.entry(key).or_insert(value);
        }
    }
    Ok(())
}

/// An upgrade (WebSocket, CONNECT) with filters of its own runs those instead of the
/// connection manager's: the scanner goes before their router too, or upgraded requests
/// would not be scanned at all.
fn insert_upgrade_filters(
    hcm: &mut Value,
    filter: &Value,
    listener: &str,
) -> Result<(), MergeError> {
    let upgrades = hcm
        .get_mut("upgrade_configs")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten();
    for upgrade in upgrades {
        let name = upgrade["upgrade_type"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        // An empty list means the connection manager's own filters, which have the scanner.
        let Some(filters) = upgrade
            .get_mut("filters")
            .and_then(Value::as_array_mut)
            .filter(|f| !f.is_empty())
        else {
            continue;
        };
        filters.retain(|f| f["name"] != EXT_PROC_FILTER);
        let router =
            filters
                .iter()
                .position(is_router)
                .ok_or_else(|| MergeError::UpgradeWithoutRouter {
                    listener: listener.to_owned(),
                    upgrade: name,
                })?;
        filters.insert(router, filter.clone());
    }
    Ok(())
}

fn opts_out(route: &Value, opt_out: &RouteOptOut) -> bool {
    if route["name"].as_str() == Some(opt_out.name.as_str()) {
        return true;
    }
    let m = &route["match"];
    match (&opt_out.path_prefix, &opt_out.path, &opt_out.regex) {
        (Some(prefix), _, _) => m["prefix"].as_str() == Some(prefix),
        (_, Some(path), _) => m["path"].as_str() == Some(path),
        (_, _, Some(regex)) => m["safe_regex"]["regex"].as_str() == Some(regex),
        _ => false,
    }
}

fn disable_routes(
    hcm: &mut Value,
    opt_outs: &[RouteOptOut],
    matched: &mut [bool],
    report: &mut MergeReport,
    listener: &str,
) -> Result<(), MergeError> {
    let Some(route_config) = hcm.get_mut("route_config") else {
        if hcm.get("rds").is_some() && !opt_outs.is_empty() {
            return Err(MergeError::RoutesFromRds {
                listener: listener.to_owned(),
            });
        }
        return Ok(());
    };
    let hosts = route_config
        .get_mut("virtual_hosts")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten();
    for host in hosts {
        let host_name = host["name"].as_str().unwrap_or("").to_owned();
        let routes = host
            .get_mut("routes")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten();
        for (index, route) in routes.enumerate() {
            report.routes += 1;
            let mut disabled = false;
            for (opt_out, seen) in opt_outs.iter().zip(matched.iter_mut()) {
                if opts_out(route, opt_out) {
                    *seen = true;
                    disabled = true;
                }
            }
            if disabled {
                let overrides = route.as_object_mut().map(|r| {
                    r.entry("typed_per_filter_config")
                        .or_insert_with(|| json!({}))
                });
                if let Some(Value::Object(overrides)) = overrides {
                    overrides.insert(
                        EXT_PROC_FILTER.to_owned(),
                        envoy::disabled_override()[EXT_PROC_FILTER].clone(),
                    );
                }
                let label = route["name"]
                    .as_str()
                    .map_or_else(|| format!("{host_name}[{index}]"), str::to_owned);
                report.disabled_routes.push(label);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TENANT: &str = include_str!("../../../testdata/envoy/tenant-bootstrap.yaml");

    fn policy() -> VirusScanPolicySpec {
        serde_json::from_value(json!({
            "selector": {},
            "routes": [
                {"name": "health", "path": "/nope"},
                {"name": "static", "pathPrefix": "/static/"},
                {"name": "ghost", "regex": "^/ghost"}
            ]
        }))
        .expect("spec")
    }

    fn filter_names(root: &Value, listener: usize) -> Vec<String> {
        root["static_resources"]["listeners"][listener]["filter_chains"][0]["filters"][0]
            ["typed_config"]["http_filters"]
            .as_array()
            .expect("filters")
            .iter()
            .map(|f| f["name"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    #[test]
    fn filter_goes_before_the_router_of_every_listener() {
        let (root, report) = merge(TENANT, &policy()).expect("merge");
        assert_eq!(report.connection_managers, 2);
        assert_eq!(
            filter_names(&root, 0),
            [EXT_PROC_FILTER, "envoy.filters.http.router"]
        );
        assert_eq!(
            filter_names(&root, 1),
            [
                "envoy.filters.http.cors",
                EXT_PROC_FILTER,
                "envoy.filters.http.router"
            ]
        );
    }

    #[test]
    fn routes_are_disabled_by_name_or_by_match_and_the_rest_kept() {
        let (root, report) = merge(TENANT, &policy()).expect("merge");
        assert_eq!(report.routes, 6);
        assert_eq!(report.disabled_routes, ["health", "app[1]"]);
        assert_eq!(report.unmatched_opt_outs, ["ghost"]);
        let routes = &root["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            ["route_config"]["virtual_hosts"][0]["routes"];
        assert_eq!(
            routes[0]["typed_per_filter_config"][EXT_PROC_FILTER]["disabled"],
            true
        );
        assert_eq!(
            routes[1]["typed_per_filter_config"][EXT_PROC_FILTER]["disabled"],
            true
        );
        assert!(routes[2].get("typed_per_filter_config").is_none());
    }

    #[test]
    fn merging_twice_changes_nothing_more() {
        let (once, _) = merge(TENANT, &policy()).expect("merge");
        let (twice, _) = merge(&envoy::to_yaml(&once).expect("yaml"), &policy()).expect("merge");
        assert_eq!(once, twice);
        let clusters = once["static_resources"]["clusters"].as_array().expect("c");
        assert_eq!(clusters.len(), 3);
        assert_eq!(clusters[2]["name"], PRODUCER_CLUSTER);
        assert_eq!(
            once["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"],
            json!(100 * 1024 * 1024 + 64 * 1024)
        );
    }

    /// The tenant bootstrap with `line` added to the first listener's connection manager.
    fn tenant_with(line: &str) -> String {
        TENANT.replacen(
            "          stat_prefix: public\n",
            &format!("          stat_prefix: public\n          {line}\n"),
            1,
        )
    }

    fn hcm(root: &Value, listener: usize) -> &Value {
        &root["static_resources"]["listeners"][listener]["filter_chains"][0]["filters"][0]["typed_config"]
    }

    #[test]
    fn every_connection_manager_normalises_paths() {
        let (root, _) = merge(TENANT, &policy()).expect("merge");
        for listener in [0, 1] {
            let hcm = hcm(&root, listener);
            assert_eq!(hcm["normalize_path"], true);
            assert_eq!(hcm["merge_slashes"], true);
            assert_eq!(
                hcm["path_with_escaped_slashes_action"],
                "UNESCAPE_AND_REDIRECT"
            );
        }
        // The tenant's own safe choices are kept.
        let tenant = tenant_with("path_with_escaped_slashes_action: REJECT_REQUEST");
        let (root, _) = merge(&tenant, &policy()).expect("merge");
        assert_eq!(
            hcm(&root, 0)["path_with_escaped_slashes_action"],
            "REJECT_REQUEST"
        );
        assert_eq!(hcm(&root, 0)["normalize_path"], true);
        let tenant = tenant_with("normalize_path: true");
        assert!(merge(&tenant, &policy()).is_ok());
    }

    #[test]
    fn path_settings_that_let_a_path_pass_as_an_opted_out_route_are_refused() {
        for (line, field) in [
            ("normalize_path: false", "normalize_path"),
            ("merge_slashes: false", "merge_slashes"),
            (
                "path_with_escaped_slashes_action: KEEP_UNCHANGED",
                "path_with_escaped_slashes_action",
            ),
            (
                "path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD",
                "path_with_escaped_slashes_action",
            ),
            (
                "path_with_escaped_slashes_action: IMPLEMENTATION_SPECIFIC_DEFAULT",
                "path_with_escaped_slashes_action",
            ),
            (
                "path_with_escaped_slashes_action: 1",
                "path_with_escaped_slashes_action",
            ),
        ] {
            match merge(&tenant_with(line), &policy()) {
                Err(MergeError::PathNotNormalised {
                    listener, field: f, ..
                }) => {
                    assert_eq!((listener.as_str(), f), ("public", field), "{line}");
                }
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn upgrade_filter_chains_get_the_filter_before_their_router() {
        let tenant = tenant_with(
            "upgrade_configs:\n          \
             - upgrade_type: websocket\n            \
               filters:\n            \
               - name: envoy.filters.http.router\n              \
                 typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }\n          \
             - upgrade_type: CONNECT\n            \
               filters: []\n          \
             - upgrade_type: h2c",
        );
        let (once, _) = merge(&tenant, &policy()).expect("merge");
        let upgrades = &hcm(&once, 0)["upgrade_configs"];
        let names: Vec<&str> = upgrades[0]["filters"]
            .as_array()
            .expect("filters")
            .iter()
            .map(|f| f["name"].as_str().unwrap_or_default())
            .collect();
        assert_eq!(names, [EXT_PROC_FILTER, "envoy.filters.http.router"]);
        // An empty list runs the connection manager's filters, which carry the scanner.
        assert_eq!(upgrades[1]["filters"], json!([]));
        assert!(upgrades[2].get("filters").is_none());
        let (twice, _) = merge(&envoy::to_yaml(&once).expect("yaml"), &policy()).expect("merge");
        assert_eq!(once, twice);

        let no_router = tenant_with(
            "upgrade_configs:\n          \
             - upgrade_type: websocket\n            \
               filters:\n            \
               - name: envoy.filters.http.cors\n              \
                 typed_config: { \"@type\": type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors }",
        );
        assert_eq!(
            merge(&no_router, &policy()),
            Err(MergeError::UpgradeWithoutRouter {
                listener: "public".to_owned(),
                upgrade: "websocket".to_owned()
            })
        );
    }

    #[test]
    fn bad_bootstraps_are_refused_with_the_reason() {
        assert!(matches!(
            merge("{{{", &policy()),
            Err(MergeError::Syntax(_))
        ));
        assert_eq!(merge("admin: {}", &policy()), Err(MergeError::NoListeners));
        let rds = r#"
static_resources:
  listeners:
  - name: dynamic
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          rds: { route_config_name: r }
          http_filters: [{ name: envoy.filters.http.router }]
"#;
        assert!(matches!(
            merge(rds, &policy()),
            Err(MergeError::RoutesFromRds { .. })
        ));
        let no_router = TENANT
            .replace("envoy.filters.http.router", "envoy.filters.http.other")
            .replace("router.v3.Router", "other.v3.Other");
        assert!(matches!(
            merge(&no_router, &policy()),
            Err(MergeError::NoRouter { .. })
        ));
    }
}
