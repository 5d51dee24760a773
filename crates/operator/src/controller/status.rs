//! The policy's status as a pure function of what the reconciler found: the outcome of
//! generating its configuration, the pods it selects, and the previous status (for the
//! conditions' transition times). No API calls here.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::protection::{self, PodState, SelectedPod};
use super::{ANNOTATION_GENERATION, ANNOTATION_POLICY, RESYNC, RETRY_MISSING_BOOTSTRAP};
use crate::bootstrap::MergeReport;
use crate::crd::{
    ConfigMapKeyRef, GatewayKind, GatewayState, GatewayStatus, VirusScanPolicy,
    VirusScanPolicyStatus,
};
use crate::gateways::Detected;
use crate::inject::{self, InjectDefaults, Injection};

/// The outcome of writing the configuration, for the ConfigGenerated condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
    pub derived: Option<ConfigMapKeyRef>,
    pub requeue: Duration,
}

impl Generated {
    /// The policy names no bootstrap: the generated ConfigMap is all there is.
    pub fn config_map(cm_name: &str) -> Generated {
        Generated {
            status: true,
            reason: "Generated",
            message: format!("Envoy configuration in ConfigMap {cm_name}"),
            derived: None,
            requeue: RESYNC,
        }
    }

    /// The objects of an Envoy Gateway or Istio policy are written (`objects` as "Kind name").
    pub fn gateway(kind: GatewayKind, objects: &[String]) -> Generated {
        Generated {
            status: true,
            reason: "GatewayConfigApplied",
            message: format!("{kind:?}: {}", objects.join(", ")),
            derived: None,
            requeue: RESYNC,
        }
    }

    /// The tenant's bootstrap is missing or cannot take the policy; tried again soon, as a
    /// ConfigMap that appears or changes may not be one the controller watches yet.
    pub fn failed(reason: &'static str, message: String) -> Generated {
        Generated {
            status: false,
            reason,
            message,
            derived: None,
            requeue: RETRY_MISSING_BOOTSTRAP,
        }
    }

    /// The derived bootstrap is in ConfigMap `name` under `key`.
    pub fn derived(name: String, key: String, report: &MergeReport) -> Generated {
        let mut message = format!(
            "derived bootstrap in ConfigMap {name}: {} connection managers filtered, routes opted out: {:?}",
            report.connection_managers, report.disabled_routes
        );
        if !report.unmatched_opt_outs.is_empty() {
            message.push_str(&format!(
                "; opt-outs that match no route: {:?}",
                report.unmatched_opt_outs
            ));
        }
        Generated {
            status: true,
            reason: "BootstrapDerived",
            message,
            derived: Some(ConfigMapKeyRef { name, key }),
            requeue: RESYNC,
        }
    }
}

/// Pods the policy selects; of those, pods carrying exactly the sidecar it injects now
/// ([`inject::check`]: a container named like it or an annotation is not enough); and pods
/// that need a restart to get it: injected from an older generation, or claiming an
/// injection by this policy that does not check.
#[derive(Debug, Default)]
pub struct PodCounts {
    pub matched: i32,
    pub injected: i32,
    pub outdated: Vec<Pod>,
    /// Every selected pod and what it runs, for the per-gateway status.
    pub selected: Vec<SelectedPod>,
}

impl PodCounts {
    /// Counts `pods`, which the API server has already filtered by the policy's selector.
    pub fn of(
        policy: &VirusScanPolicy,
        defaults: &InjectDefaults,
        pods: impl IntoIterator<Item = Pod>,
    ) -> PodCounts {
        let name = policy.name_any();
        let generation = policy.metadata.generation.unwrap_or_default().to_string();
        let mut counts = PodCounts::default();
        for pod in pods {
            counts.matched += 1;
            let annotations = pod.annotations();
            let state = if annotations
                .get(ANNOTATION_POLICY)
                .is_some_and(|p| *p != name)
            {
                // Injected by another policy before this one selected it too: not this one's.
                PodState::OtherPolicy
            } else {
                match inject::check(&pod, policy, defaults) {
                    Injection::Absent if inject::opted_out(&pod) => PodState::OptedOut,
                    Injection::Absent => PodState::Absent,
                    Injection::Verified
                        if annotations.get(ANNOTATION_GENERATION) == Some(&generation) =>
                    {
                        PodState::Injected
                    }
                    Injection::Verified => PodState::OlderGeneration,
                    Injection::Mismatch => PodState::Mismatch,
                }
            };
            counts.injected +=
                matches!(state, PodState::Injected | PodState::OlderGeneration) as i32;
            counts.selected.push(SelectedPod::of(&pod, state));
            if matches!(state, PodState::OlderGeneration | PodState::Mismatch) {
                counts.outdated.push(pod);
            }
        }
        counts
    }

    pub fn outdated(&self) -> i32 {
        i32::try_from(self.outdated.len()).unwrap_or(i32::MAX)
    }
}

/// The status to apply: Gateway, ConfigGenerated and Ready conditions, pod counts,
/// references.
pub fn status(
    policy: &VirusScanPolicy,
    generated: &Generated,
    pods: &PodCounts,
    cm_name: &str,
    gateway: &Detected,
    gateways: Vec<GatewayStatus>,
    now: Timestamp,
) -> VirusScanPolicyStatus {
    let generation = policy.metadata.generation;
    let previous = policy.status.clone().unwrap_or_default();
    let (matched, injected, outdated) = (pods.matched, pods.injected, pods.outdated());
    let (ready_reason, ready_message) = if generated.status {
        (
            "Reconciled",
            format!("{matched} pods matched, {injected} injected, {outdated} outdated"),
        )
    } else {
        (generated.reason, generated.message.clone())
    };
    let conditions = vec![
        condition(
            &previous,
            "Gateway",
            true,
            gateway.reason,
            &gateway.message,
            generation,
            now,
        ),
        condition(
            &previous,
            "ConfigGenerated",
            generated.status,
            generated.reason,
            &generated.message,
            generation,
            now,
        ),
        protected_condition(&previous, &gateways, generation, now),
        condition(
            &previous,
            "Ready",
            generated.status,
            ready_reason,
            &ready_message,
            generation,
            now,
        ),
    ];
    VirusScanPolicyStatus {
        observed_generation: generation,
        conditions,
        matched_pods: matched,
        injected_pods: injected,
        outdated_pods: outdated,
        config_map_ref: Some(cm_name.to_owned()),
        derived_bootstrap_ref: generated.derived.clone(),
        gateway: Some(gateway.kind),
        protected_gateways: Some(protection::summary(&gateways)),
        gateways,
    }
}

/// `Protected`: True when the policy selects at least one gateway and every one of them is
/// protected; otherwise the message names each gateway that is not, and why.
fn protected_condition(
    previous: &VirusScanPolicyStatus,
    gateways: &[GatewayStatus],
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let unprotected: Vec<String> = gateways
        .iter()
        .filter(|g| g.state != GatewayState::Protected)
        .map(|g| format!("{} is {:?}: {}", g.name, g.state, g.message))
        .collect();
    let (status, reason, message) = if gateways.is_empty() {
        (
            false,
            "NoGateways",
            "the selector matches no pod".to_owned(),
        )
    } else if unprotected.is_empty() {
        (
            true,
            "AllProtected",
            format!("{} gateways protected", gateways.len()),
        )
    } else {
        (false, "GatewaysUnprotected", unprotected.join(". "))
    };
    condition(
        previous,
        "Protected",
        status,
        reason,
        &message,
        generation,
        now,
    )
}

/// A condition; its transition time moves only when its status changes.
fn condition(
    previous: &VirusScanPolicyStatus,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let last_transition_time = previous
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| Time(now), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.to_owned(),
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(generation: i64) -> VirusScanPolicy {
        serde_json::from_value(json!({
            "apiVersion": "virusscan.aether-platform.io/v1alpha1",
            "kind": "VirusScanPolicy",
            "metadata": {"name": "gw", "namespace": "t", "generation": generation},
            "spec": {"selector": {"matchLabels": {"app": "gw"}}}
        }))
        .expect("policy")
    }

    fn pod(name: &str, annotations: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name, "annotations": annotations}}))
            .expect("pod")
    }

    fn defaults() -> InjectDefaults {
        InjectDefaults::plain("producer:1", "redis")
    }

    /// A pod as the injector leaves it when `policy` selects it.
    fn injected(name: &str, policy: &VirusScanPolicy) -> Pod {
        inject::inject(&pod(name, json!({})), policy, &defaults())
    }

    fn envoy() -> Detected {
        crate::gateways::detect(&policy(1).spec, [])
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(seconds).expect("time")
    }

    fn find<'a>(s: &'a VirusScanPolicyStatus, type_: &str) -> &'a Condition {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition")
    }

    #[test]
    fn pods_are_counted_as_matched_injected_and_outdated() {
        let mut changed = policy(2);
        changed.spec.scan.timeout_seconds = 5;
        let counts = PodCounts::of(
            &policy(3),
            &defaults(),
            [
                pod("plain", json!({})),
                injected("current", &policy(3)),
                // Same sidecar, older generation: injected, and its Envoy config is outdated.
                injected("old", &policy(2)),
                // A different sidecar from an older generation: a restart brings the new one.
                injected("changed", &changed),
                pod(
                    "other-policy",
                    json!({ANNOTATION_POLICY: "other", ANNOTATION_GENERATION: "1"}),
                ),
            ],
        );
        assert_eq!(
            (counts.matched, counts.injected, counts.outdated()),
            (5, 2, 2)
        );
        let outdated: Vec<String> = counts.outdated.iter().map(|p| p.name_any()).collect();
        assert_eq!(outdated, ["old", "changed"]);
    }

    #[test]
    fn a_forged_injection_is_not_counted_as_injected() {
        let p = policy(3);
        let real = injected("real", &p);
        // The annotations of a real injection over a container named like the sidecar.
        let mut fake = pod("fake", json!({}));
        fake.metadata.annotations = real.metadata.annotations.clone();
        fake.spec = Some(
            serde_json::from_value(json!({"containers": [
                {"name": "envoy", "image": "envoy"},
                {"name": inject::SIDECAR, "image": "busybox"}
            ]}))
            .expect("spec"),
        );
        // Annotations alone.
        let mut bare = pod("bare", json!({}));
        bare.metadata.annotations = real.metadata.annotations.clone();
        let counts = PodCounts::of(&p, &defaults(), [real, fake, bare]);
        assert_eq!(
            (counts.matched, counts.injected, counts.outdated()),
            (3, 1, 2)
        );
    }

    #[test]
    fn ready_reports_the_pod_counts_when_the_config_is_generated() {
        let p = policy(2);
        let pods = PodCounts::of(&p, &defaults(), [injected("a", &policy(1))]);
        let s = status(
            &p,
            &Generated::config_map("vsp-gw-envoy"),
            &pods,
            "vsp-gw-envoy",
            &envoy(),
            Vec::new(),
            at(10),
        );
        assert_eq!(s.observed_generation, Some(2));
        assert_eq!(
            (s.matched_pods, s.injected_pods, s.outdated_pods),
            (1, 1, 1)
        );
        let ready = find(&s, "Ready");
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Reconciled")
        );
        assert_eq!(ready.message, "1 pods matched, 1 injected, 1 outdated");
        assert_eq!(find(&s, "ConfigGenerated").reason, "Generated");
        assert_eq!(s.config_map_ref.as_deref(), Some("vsp-gw-envoy"));
        assert_eq!(s.derived_bootstrap_ref, None);
    }

    #[test]
    fn a_failed_bootstrap_makes_both_conditions_false_with_its_reason() {
        let p = policy(1);
        let failed =
            Generated::failed("BootstrapInvalid", "ConfigMap envoy key e.yaml: bad".into());
        let s = status(
            &p,
            &failed,
            &PodCounts::default(),
            "vsp-gw-envoy",
            &envoy(),
            Vec::new(),
            at(10),
        );
        for type_ in ["ConfigGenerated", "Ready"] {
            let c = find(&s, type_);
            assert_eq!(
                (c.status.as_str(), c.reason.as_str(), c.message.as_str()),
                (
                    "False",
                    "BootstrapInvalid",
                    "ConfigMap envoy key e.yaml: bad"
                )
            );
        }
        assert_eq!(failed.requeue, RETRY_MISSING_BOOTSTRAP);
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let mut p = policy(1);
        let ok = Generated::config_map("cm");
        p.status = Some(status(
            &p,
            &ok,
            &PodCounts::default(),
            "cm",
            &envoy(),
            Vec::new(),
            at(10),
        ));
        let again = status(
            &p,
            &ok,
            &PodCounts::default(),
            "cm",
            &envoy(),
            Vec::new(),
            at(20),
        );
        assert_eq!(find(&again, "Ready").last_transition_time, Time(at(10)));
        p.status = Some(again);
        let failed = Generated::failed("BootstrapNotFound", "gone".into());
        let changed = status(
            &p,
            &failed,
            &PodCounts::default(),
            "cm",
            &envoy(),
            Vec::new(),
            at(30),
        );
        assert_eq!(find(&changed, "Ready").last_transition_time, Time(at(30)));
    }

    #[test]
    fn derived_message_names_opt_outs_that_match_no_route() {
        let report = MergeReport {
            connection_managers: 2,
            routes: 3,
            disabled_routes: vec!["static".into()],
            unmatched_opt_outs: vec!["health".into()],
        };
        let g = Generated::derived("vsp-gw-bootstrap".into(), "envoy.yaml".into(), &report);
        assert_eq!(
            g.message,
            "derived bootstrap in ConfigMap vsp-gw-bootstrap: 2 connection managers filtered, \
             routes opted out: [\"static\"]; opt-outs that match no route: [\"health\"]"
        );
        assert_eq!(
            g.derived,
            Some(ConfigMapKeyRef {
                name: "vsp-gw-bootstrap".into(),
                key: "envoy.yaml".into()
            })
        );
    }
}
