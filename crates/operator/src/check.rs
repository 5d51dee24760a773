//! `virus-scan-operator check -n NS POD|deploy/NAME`: why a pod is or is not protected, step
//! by step, as the injector and the controller decide it: the namespace's opt-in label, the
//! pod's opt-out, the policies that select it (none, one, or conflicting ones), whether it
//! carries the sidecar of that policy's current generation, and whether the policy's
//! generated gateway configuration is Ready.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::ResourceExt;
use kube::api::{Api, ListParams, ObjectMeta};

use crate::crd::VirusScanPolicy;
use crate::error::Error;
use crate::{inject, selector};

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The namespace of the pod or Deployment.
    #[arg(short = 'n', long = "namespace", default_value = "default")]
    pub namespace: String,
    /// A pod's name, or `deploy/NAME` for the pods a Deployment creates.
    pub target: String,
    /// The label a namespace opts in to injection with (`=enabled`), as in the chart.
    #[arg(long, default_value = "virusscan.aether-platform.io/injection")]
    pub namespace_label: String,
    /// Where Envoy Gateway runs the proxies of other namespaces' Gateways.
    #[arg(
        long,
        env = "ENVOY_GATEWAY_NAMESPACE",
        default_value = "envoy-gateway-system"
    )]
    pub envoy_gateway_namespace: String,
}

/// One finding: whether it stands in the way of protection, and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub protected: bool,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for finding in &self.findings {
            writeln!(
                f,
                "{} {}",
                if finding.ok { "ok  " } else { "FAIL" },
                finding.text
            )?;
        }
        if self.protected {
            writeln!(f, "protected")
        } else {
            writeln!(f, "NOT protected")
        }
    }
}

/// Checks the pod (or a Deployment's pod template) against the cluster's policies.
pub async fn check(client: &kube::Client, args: &CheckArgs) -> Result<Report, Error> {
    let ns = args.namespace.as_str();
    let (pod, template) = match args.target.strip_prefix("deploy/") {
        Some(name) => {
            let d = Api::<Deployment>::namespaced(client.clone(), ns)
                .get(name)
                .await?;
            let t = d.spec.map(|s| s.template).unwrap_or_default();
            let pod = Pod {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(ns.to_owned()),
                    ..t.metadata.unwrap_or_default()
                },
                spec: t.spec,
                ..Pod::default()
            };
            (pod, true)
        }
        None => (
            Api::<Pod>::namespaced(client.clone(), ns)
                .get(&args.target)
                .await?,
            false,
        ),
    };
    let mut findings = Vec::new();
    let mut say = |ok: bool, text: String| findings.push(Finding { ok, text });

    let (deciding, envoy_gateway_only) =
        inject::deciding_namespace(&pod, ns, Some(&args.envoy_gateway_namespace));
    let namespace = Api::<Namespace>::all(client.clone()).get(deciding).await?;
    let opted_in = namespace
        .labels()
        .get(&args.namespace_label)
        .map(String::as_str)
        == Some("enabled");
    say(
        opted_in,
        if opted_in {
            format!(
                "namespace {deciding} opts in ({}=enabled)",
                args.namespace_label
            )
        } else {
            format!(
                "namespace {deciding} has not opted in: label it {}=enabled",
                args.namespace_label
            )
        },
    );
    let opted_out = inject::opted_out(&pod);
    say(
        !opted_out,
        if opted_out {
            format!("the pod opts out ({}: \"false\")", inject::INJECT)
        } else {
            "the pod does not opt out".to_owned()
        },
    );
    let policies = Api::<VirusScanPolicy>::namespaced(client.clone(), deciding)
        .list(&ListParams::default())
        .await?;
    let selecting: Vec<&VirusScanPolicy> = policies
        .items
        .iter()
        .filter(|p| selector::matches(&p.spec.selector, pod.labels()))
        .filter(|p| {
            !envoy_gateway_only
                || crate::gateways::detect(&p.spec, []).kind
                    == crate::crd::GatewayKind::EnvoyGateway
        })
        .collect();
    let policy = match selecting.as_slice() {
        [] => {
            say(
                false,
                format!(
                    "no VirusScanPolicy in {deciding} selects the pod's labels {:?}",
                    pod.labels()
                ),
            );
            None
        }
        [one] => {
            say(
                true,
                format!(
                    "VirusScanPolicy {deciding}/{} selects the pod",
                    one.name_any()
                ),
            );
            Some(*one)
        }
        many => {
            let names: Vec<String> = many.iter().map(|p| p.name_any()).collect();
            say(
                false,
                format!(
                    "conflicting policies select the pod ({}): the webhook refuses it; make their selectors disjoint",
                    names.join(", ")
                ),
            );
            None
        }
    };
    let mut injected = false;
    if let Some(p) = policy {
        let generation = p.metadata.generation.unwrap_or_default().to_string();
        let annotations = pod.annotations();
        let has_sidecar = pod.spec.iter().any(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.name == inject::SIDECAR)
        });
        if template {
            injected = true;
            say(
                true,
                "a pod template: its pods get the sidecar when they are created".to_owned(),
            );
        } else if !has_sidecar {
            say(
                false,
                "the pod has no sidecar: it was created before the policy or the webhook (restart it)"
                    .to_owned(),
            );
        } else if annotations.get(inject::ANNOTATION_POLICY) != Some(&p.name_any()) {
            say(
                false,
                "the sidecar was not injected for this policy (restart the pod)".to_owned(),
            );
        } else if annotations.get(inject::ANNOTATION_GENERATION) != Some(&generation) {
            say(
                false,
                format!(
                    "outdated sidecar: injected for generation {}, the policy is at {generation} (restart the pod)",
                    annotations
                        .get(inject::ANNOTATION_GENERATION)
                        .map_or("?", String::as_str)
                ),
            );
        } else {
            injected = true;
            say(
                true,
                format!("the sidecar of generation {generation} is injected"),
            );
        }
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
        match ready {
            Some(c) if c.status == "True" => say(
                true,
                "the policy's gateway configuration is Ready".to_owned(),
            ),
            Some(c) => say(
                false,
                format!("the policy is not Ready: {}: {}", c.reason, c.message),
            ),
            None => say(
                false,
                "the policy has no Ready condition yet: is the operator running?".to_owned(),
            ),
        }
    }
    let protected = findings.iter().all(|f| f.ok) && policy.is_some() && injected;
    Ok(Report {
        findings,
        protected,
    })
}
