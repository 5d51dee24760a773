//! `virus-scan-operator envoy-config`: what the controller would write, rendered offline
//! from a policy file (and, with `--bootstrap`, merged into a tenant's bootstrap).

use std::path::Path;

use serde_json::{Value, json};

use kube::ResourceExt;

use crate::bootstrap;
use crate::cli::{EnvoyConfigArgs, Target};
use crate::crd::{GatewayKind, VirusScanPolicy, VirusScanPolicySpec};
use crate::error::Error;
use crate::{envoy, gateways};

/// The pieces `--piece` names, each with the title it has in the full output.
const PIECES: [(&str, &str); 5] = [
    (
        "filter",
        "the http filter, before envoy.filters.http.router",
    ),
    ("cluster", "the producer cluster"),
    (
        "connection-manager",
        "path handling for every http_connection_manager with the filter",
    ),
    ("routes", "typed_per_filter_config for each opted-out route"),
    ("bootstrap", "a complete example bootstrap"),
];

fn read(path: &Path) -> Result<String, Error> {
    let read = if path.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    };
    read.map_err(|error| Error::Read {
        path: if path.as_os_str() == "-" {
            "the policy from stdin".to_owned()
        } else {
            path.display().to_string()
        },
        error,
    })
}

/// Renders what `args` asks for, warnings (opt-outs that match no route) on stderr.
pub fn envoy_config(args: &EnvoyConfigArgs) -> Result<String, Error> {
    let text = read(&args.file)?;
    let policy: VirusScanPolicy = serde_saphyr::from_str(&text).map_err(|e| Error::NotAPolicy {
        path: args.file.display().to_string(),
        reason: e.to_string(),
    })?;
    let spec = &policy.spec;
    let kind = match args.target {
        Some(Target::Envoy) => GatewayKind::Envoy,
        Some(Target::EnvoyGateway) => GatewayKind::EnvoyGateway,
        Some(Target::Istio) => GatewayKind::Istio,
        None => gateways::detect(spec, []).kind,
    };
    if kind != GatewayKind::Envoy {
        if args.piece.is_some() || args.bootstrap.is_some() {
            return Err(Error::NotForTarget);
        }
        let namespace = policy.namespace().unwrap_or_else(|| "default".to_owned());
        let objects = gateways::render(kind, &policy.name_any(), &namespace, spec)?;
        let mut out = String::new();
        for object in &objects {
            out.push_str("---\n");
            out.push_str(&envoy::to_yaml(object)?);
        }
        return Ok(out);
    }
    if let Some(path) = &args.bootstrap {
        let tenant = read(path)?;
        let (merged, report) = bootstrap::merge(&tenant, spec).map_err(|error| Error::Merge {
            path: path.display().to_string(),
            error,
        })?;
        for route in &report.unmatched_opt_outs {
            eprintln!("warning: opted-out route {route:?} matches no route of the bootstrap");
        }
        return Ok(envoy::to_yaml(&merged)?);
    }
    match &args.piece {
        Some(name) => Ok(envoy::to_yaml(&piece(spec, name)?)?),
        None => {
            let mut out = String::new();
            for (name, title) in PIECES {
                out.push_str(&format!(
                    "---\n# {title}\n{}",
                    envoy::to_yaml(&piece(spec, name)?)?
                ));
            }
            Ok(out)
        }
    }
}

fn piece(spec: &VirusScanPolicySpec, name: &str) -> Result<Value, Error> {
    Ok(match name {
        "filter" => envoy::ext_proc_filter(spec),
        "cluster" => envoy::producer_cluster(spec),
        "connection-manager" => Value::Object(envoy::connection_manager_settings()),
        "routes" => json!(envoy::route_overrides(spec)),
        "bootstrap" => envoy::example_bootstrap(spec),
        other => return Err(Error::UnknownPiece(other.to_owned())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path, piece: Option<&str>, bootstrap: Option<&str>) -> EnvoyConfigArgs {
        let file = dir.join("policy.yaml");
        std::fs::write(
            &file,
            "apiVersion: virusscan.aether-platform.io/v1alpha1\nkind: VirusScanPolicy\n\
             metadata: {name: gw, namespace: t}\nspec: {selector: {}}\n",
        )
        .expect("write");
        let bootstrap = bootstrap.map(|text| {
            let path = dir.join("bootstrap.yaml");
            std::fs::write(&path, text).expect("write");
            path
        });
        EnvoyConfigArgs {
            file,
            bootstrap,
            piece: piece.map(str::to_owned),
            target: None,
        }
    }

    #[test]
    fn every_piece_is_printed_under_its_title() {
        let dir = tempfile::tempdir().expect("dir");
        let out = envoy_config(&args(dir.path(), None, None)).expect("render");
        assert_eq!(out.matches("---\n# ").count(), PIECES.len());
        assert!(out.contains(envoy::EXT_PROC_FILTER));
    }

    #[test]
    fn gateway_targets_print_their_objects() {
        let dir = tempfile::tempdir().expect("dir");
        let mut a = args(dir.path(), None, None);
        std::fs::write(
            &a.file,
            "apiVersion: virusscan.aether-platform.io/v1alpha1\nkind: VirusScanPolicy\n\
             metadata: {name: gw, namespace: t}\nspec:\n  selector: {matchLabels: {app: gw}}\n\
             \x20 producer: {transport: UnixSocket}\n  envoyGateway: {gatewayName: web}\n",
        )
        .expect("write");
        a.target = Some(Target::EnvoyGateway);
        let out = envoy_config(&a).expect("render");
        assert_eq!(out.matches("---\n").count(), 3, "{out}");
        assert!(out.contains("kind: EnvoyExtensionPolicy"), "{out}");
        assert!(out.contains("failOpen: false"), "{out}");
        a.target = Some(Target::Istio);
        let out = envoy_config(&a).expect("render");
        assert!(out.contains("kind: EnvoyFilter"), "{out}");
        assert!(out.contains("namespace: t"), "{out}");
        a.piece = Some("filter".to_owned());
        let err = envoy_config(&a).expect_err("piece");
        assert_eq!(err.metric_label(), "invalid_argument");
    }

    #[test]
    fn an_unknown_piece_or_an_unmergeable_bootstrap_is_an_error() {
        let dir = tempfile::tempdir().expect("dir");
        let err = envoy_config(&args(dir.path(), Some("listener"), None)).expect_err("piece");
        assert_eq!(err.metric_label(), "invalid_argument");
        let err = envoy_config(&args(dir.path(), None, Some("static_resources: {}\n")))
            .expect_err("merge");
        assert!(
            matches!(
                &err,
                Error::Merge {
                    error: bootstrap::MergeError::NoListeners,
                    ..
                }
            ),
            "{err}"
        );
    }
}
