//! `VirusScanPolicy`: the tenant's whole interface to the scanner. The schema is generated
//! from these types (schemars), with CEL rules where a rule spans fields; `crds/` holds the
//! rendered YAML and a test fails when it is stale.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "virusscan.aether-platform.io";

/// Scans the bodies that pass through a tenant's Envoy gateway with ClamAV: the operator
/// injects the producer sidecar into the selected gateway pods and generates the Envoy
/// ext_proc configuration that sends every body to it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "virusscan.aether-platform.io",
    version = "v1alpha1",
    kind = "VirusScanPolicy",
    doc = "A VirusScanPolicy: which gateway pods are scanned, how, and which routes are not.",
    plural = "virusscanpolicies",
    shortname = "vsp",
    namespaced,
    status = "VirusScanPolicyStatus",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Gateway","type":"string","jsonPath":".status.gateway"}"#,
    printcolumn = r#"{"name":"Protected","type":"string","jsonPath":".status.protectedGateways"}"#,
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.scan.mode"}"#,
    printcolumn = r#"{"name":"Failure","type":"string","jsonPath":".spec.scan.failureMode","priority":1}"#,
    printcolumn = r#"{"name":"Matched","type":"integer","jsonPath":".status.matchedPods"}"#,
    printcolumn = r#"{"name":"Injected","type":"integer","jsonPath":".status.injectedPods"}"#,
    printcolumn = r#"{"name":"Outdated","type":"integer","jsonPath":".status.outdatedPods","priority":1}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.gateway) || self.gateway != 'EnvoyGateway' || (has(self.producer) && has(self.producer.transport) && self.producer.transport == 'UnixSocket')").message("gateway EnvoyGateway requires producer.transport UnixSocket: Envoy Gateway refuses loopback backends"))]
pub struct VirusScanPolicySpec {
    /// The tenant gateway pods, in this policy's namespace, that get the producer sidecar
    /// and whose Envoy sends bodies to it.
    pub selector: LabelSelector,

    /// What is scanned and what happens when a scan cannot give a clean verdict.
    #[serde(default)]
    pub scan: ScanSettings,

    /// Routes that are not scanned. Each gets Envoy's `ExtProcPerRoute { disabled: true }`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.all(r, self.exists_one(s, s.name == r.name))").message("route names must be unique"))]
    pub routes: Vec<RouteOptOut>,

    /// The producer sidecar injected into each gateway pod.
    #[serde(default)]
    pub producer: ProducerSettings,

    /// The Redis that carries scan tasks to the scanners. Without it, the operator's
    /// default (the chart's Redis) is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisSettings>,

    /// A ReadWriteMany volume shared with the scanners (they mount it at
    /// /var/spool/virus-scanner), for bodies above `scan.fileThresholdMB`: such bodies are
    /// spilled to it and queued by path, so they never pass through Redis. Without it, the
    /// spool is an emptyDir that only the sidecar can read: bodies above the threshold are
    /// still held on it, but are sent to the scanners through Redis (so Redis needs room
    /// for bodies up to `scan.maxBodyMB`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_volume: Option<SharedVolume>,

    /// How the gateway's Envoy reaches the producer, and the optional bootstrap merge.
    #[serde(default)]
    pub envoy: EnvoySettings,

    /// The kind of gateway the selected pods run, which decides what the operator writes:
    /// Envoy (a ConfigMap, and the bootstrap merge), EnvoyGateway (an EnvoyExtensionPolicy,
    /// a Backend and a ClientTrafficPolicy) or Istio (an EnvoyFilter). Without it, derived
    /// from the selector's and the selected pods' labels; the `Gateway` condition says which
    /// and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayKind>,

    /// Envoy Gateway: the Gateway whose proxies are scanned. Without it, the name the
    /// selector requires of label `gateway.envoyproxy.io/owning-gateway-name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_gateway: Option<EnvoyGatewaySettings>,
}

/// What runs the selected pods' Envoy, and so which API carries the scan configuration.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayKind {
    /// A tenant's own Envoy: generated ConfigMap and optional bootstrap merge.
    Envoy,
    /// Envoy Gateway (gateway.envoyproxy.io): EnvoyExtensionPolicy, Backend, ClientTrafficPolicy.
    EnvoyGateway,
    /// An Istio gateway: an EnvoyFilter (networking.istio.io/v1alpha3).
    Istio,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnvoyGatewaySettings {
    /// The Gateway (gateway.networking.k8s.io) in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub gateway_name: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'FullDuplexStreamed' || self.failureMode == 'FailClosed'").message("mode FullDuplexStreamed requires failureMode FailClosed: Envoy would forward the body unscanned after a failure"))]
#[x_kube(validation = Rule::new("self.fileThresholdMB <= self.maxBodyMB").message("fileThresholdMB must not exceed maxBodyMB"))]
#[x_kube(validation = Rule::new("self.infectedStatusCode >= 400 && self.infectedStatusCode <= 599").message("infectedStatusCode must be an HTTP error status (400-599)"))]
pub struct ScanSettings {
    /// Which bodies are scanned: client uploads (Request), downloads (Response) or both.
    #[serde(default = "default_directions")]
    #[schemars(length(min = 1, max = 2))]
    #[x_kube(validation = Rule::new("self.all(d, self.exists_one(e, e == d))").message("directions must be unique"))]
    pub directions: Vec<Direction>,

    /// Buffered: Envoy buffers the whole body and sends it in one message (bodies up to the
    /// listener's buffer limit). FullDuplexStreamed: Envoy streams the body; the producer
    /// holds it, spilling to disk, and releases it only after a clean verdict.
    #[serde(default)]
    pub mode: ProcessingMode,

    /// The largest body that is scanned, in MiB. Larger bodies get 413 (unscannable).
    #[serde(default = "default_max_body_mb", rename = "maxBodyMB")]
    #[schemars(range(min = 1, max = 16384))]
    pub max_body_mb: u32,

    /// Bodies above this many MiB are held on the spool volume instead of in memory. With
    /// `sharedVolume` the scanners read them from there (queued by path); without it they
    /// are sent to the scanners through Redis. At most 64: smaller bodies travel inside the
    /// task, and the queue takes no task larger than that.
    #[serde(default = "default_file_threshold_mb", rename = "fileThresholdMB")]
    #[schemars(range(min = 1, max = 64))]
    pub file_threshold_mb: u32,

    /// How long a request may wait for its verdict.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: u32,

    /// FailClosed (default): a scan that cannot finish answers 503. FailOpen lets the body
    /// through unscanned; only for Buffered mode.
    #[serde(default)]
    pub failure_mode: FailureMode,

    /// The HTTP status for an infected body.
    #[serde(default = "default_infected_status")]
    pub infected_status_code: u16,

    /// Let bodies the scanner cannot judge (over a size limit, encrypted) through.
    #[serde(default)]
    pub allow_unscannable: bool,

    /// The queue a request goes to when it carries no `X-Priority: high`.
    #[serde(default)]
    pub default_priority: Priority,

    /// `Range` and `If-Range` request headers on scanned routes. Strip (default): removed,
    /// so the upstream sends the whole representation, which is scanned. Refuse: a request
    /// with `Range` is answered 416. Allow: passed on; a 206 answer that does not cover the
    /// whole representation is unscannable, since a part cannot be judged alone.
    #[serde(default)]
    pub range_requests: RangeRequests,

    /// Files carried base64-encoded in the string values of a JSON body are decoded and
    /// scanned too (default true). With false, a JSON body is scanned only as it is, and a
    /// file inside it reaches the scanner as base64 text, which signatures do not match.
    #[serde(default = "default_true")]
    pub embedded_files: bool,
}

impl Default for ScanSettings {
    fn default() -> Self {
        ScanSettings {
            directions: default_directions(),
            mode: ProcessingMode::default(),
            max_body_mb: default_max_body_mb(),
            file_threshold_mb: default_file_threshold_mb(),
            timeout_seconds: default_timeout_seconds(),
            failure_mode: FailureMode::default(),
            infected_status_code: default_infected_status(),
            allow_unscannable: false,
            default_priority: Priority::default(),
            range_requests: RangeRequests::default(),
            embedded_files: true,
        }
    }
}

fn default_directions() -> Vec<Direction> {
    vec![Direction::Request, Direction::Response]
}
fn default_max_body_mb() -> u32 {
    100
}
fn default_file_threshold_mb() -> u32 {
    10
}
fn default_timeout_seconds() -> u32 {
    30
}
fn default_infected_status() -> u16 {
    406
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProcessingMode {
    #[default]
    Buffered,
    FullDuplexStreamed,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailureMode {
    #[default]
    FailClosed,
    FailOpen,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Priority {
    #[default]
    Normal,
    High,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RangeRequests {
    #[default]
    Strip,
    Refuse,
    Allow,
}

/// A route that is not scanned, matched the way Envoy matches routes: by path prefix, exact
/// path or RE2 regex (at most one). In a merged bootstrap, a tenant route is opted out when
/// its name equals `name` or its match is the same; on Istio, the Envoy route named `name`
/// (a VirtualService's `http[].name`); on Envoy Gateway, the HTTPRoute rule `httpRoute`
/// names. A route names a path match, an `httpRoute` or both.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.pathPrefix) ? 1 : 0) + (has(self.path) ? 1 : 0) + (has(self.regex) ? 1 : 0) == 1 || (!has(self.pathPrefix) && !has(self.path) && !has(self.regex) && has(self.httpRoute))").message("a route needs exactly one of pathPrefix, path and regex, or an httpRoute"))]
pub struct RouteOptOut {
    /// Unique within the policy; also matched against Envoy route names.
    #[schemars(length(min = 1, max = 128))]
    pub name: String,
    /// Envoy Gateway: the HTTPRoute rule (in the policy's namespace) that is not scanned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_route: Option<HttpRouteRuleRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub path_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub path: Option<String>,
    /// An RE2 regular expression over the path (Envoy's `safe_regex`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub regex: Option<String>,
}

/// An HTTPRoute, or one rule of it: the rule's `name` (Gateway API `HTTPRouteRule.name`)
/// is the policy attachment's `sectionName`. Without `sectionName`, the whole HTTPRoute.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct HttpRouteRuleRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub section_name: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ProducerSettings {
    /// The producer image. Defaults to the operator's own release of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,

    /// Resources of the sidecar; defaults: requests 50m CPU / 64Mi, limit 256Mi.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Inject a native sidecar (an init container with `restartPolicy: Always`, which starts
    /// before Envoy and stops after it). Set false for a regular container.
    #[serde(default = "default_true")]
    pub native_sidecar: bool,

    /// How Envoy reaches the producer: Tcp on localhost, or UnixSocket through a shared
    /// emptyDir (Envoy Gateway refuses loopback backends).
    #[serde(default)]
    pub transport: Transport,

    /// The gRPC port when the transport is Tcp.
    #[serde(default = "default_grpc_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,

    /// Also serve ICAP (port 1344), on the pod's loopback only, for an ICAP client in the
    /// same pod. Off by default: the gateway speaks ext_proc.
    #[serde(default)]
    pub icap: bool,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        ProducerSettings {
            image: None,
            resources: None,
            native_sidecar: true,
            transport: Transport::default(),
            port: default_grpc_port(),
            icap: false,
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_grpc_port() -> u16 {
    50051
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Transport {
    #[default]
    Tcp,
    UnixSocket,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RedisSettings {
    #[schemars(length(min = 1, max = 253))]
    pub host: String,
    #[serde(default = "default_redis_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Connect with TLS (`rediss://`).
    #[serde(default)]
    pub tls: bool,
    /// The Redis ACL username, from a Secret in the policy's namespace (without it, the
    /// default user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_secret_ref: Option<SecretKeyRef>,
    /// The Redis password, from a Secret in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// A CA bundle (PEM) for TLS, from a Secret in the policy's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<SecretKeyRef>,
}

fn default_redis_port() -> u16 {
    6379
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SharedVolume {
    /// A PersistentVolumeClaim (ReadWriteMany) that the scanners mount too.
    #[schemars(length(min = 1, max = 253))]
    pub claim_name: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EnvoySettings {
    /// The gateway's own Envoy bootstrap. When set, the operator writes a derived
    /// bootstrap (this one with the ext_proc filter, the producer cluster and the route
    /// opt-outs merged in) and the injector mounts it in place of this one, which is never
    /// modified.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap: Option<ConfigMapKeyRef>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMapKeyRef {
    /// A ConfigMap in the policy's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// The key that holds the Envoy bootstrap (YAML or JSON).
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

/// What the operator observed and did.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VirusScanPolicyStatus {
    /// The generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready and ConfigGenerated.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Pods the selector matches.
    #[serde(default)]
    pub matched_pods: i32,
    /// Matched pods that carry exactly the sidecar this policy injects, as the injector
    /// recorded it; a container named like it or an annotation alone does not count.
    #[serde(default)]
    pub injected_pods: i32,
    /// Matched pods that need a restart to run what this policy injects now: injected from
    /// an older generation, or claiming an injection by this policy that does not match it.
    #[serde(default)]
    pub outdated_pods: i32,
    /// The ConfigMap with the generated Envoy configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<String>,
    /// The ConfigMap with the derived bootstrap, when the policy names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived_bootstrap_ref: Option<ConfigMapKeyRef>,
    /// The gateway kind the configuration was written for (`spec.gateway` or derived).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayKind>,
    /// Each gateway the policy selects (a Deployment or other workload of selected pods;
    /// for Envoy Gateway, the Gateway whose proxies they are), and whether it is protected.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<GatewayStatus>,
    /// "protected/selected" gateways, as `kubectl get vsp` shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protected_gateways: Option<String>,
}

/// One selected gateway: its pods, and whether every body through it is scanned.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// The workload (Deployment, StatefulSet, DaemonSet, or the pod itself) or, for Envoy
    /// Gateway, the Gateway.
    pub name: String,
    /// Where its pods run.
    pub namespace: String,
    pub state: GatewayState,
    /// Why, naming the pods or the objects concerned.
    pub message: String,
    /// Its selected pods, those running the sidecar this policy injects now, and those
    /// that need a restart to run it.
    pub pods: i32,
    pub injected: i32,
    pub outdated: i32,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum GatewayState {
    /// Every pod runs the current sidecar and nothing overrides the scan.
    Protected,
    /// Some pods run without the sidecar (created before the policy, opted out, or
    /// injected by another policy): bodies through them are not scanned.
    NotInjected,
    /// Every pod has a sidecar, some from an older generation of the policy or not the one
    /// it injects now: restart them.
    Outdated,
    /// The gateway is not configured to call the producer: the policy's configuration is
    /// not written (see ConfigGenerated), its EnvoyExtensionPolicy is missing, or these are
    /// proxies of a Gateway the policy does not attach to.
    NotConfigured,
    /// The gateway's own API replaces the scan on some routes (Envoy Gateway: a tenant's
    /// EnvoyExtensionPolicy on an HTTPRoute of the Gateway).
    Overridden,
    /// No pod of it is running: nothing to protect yet.
    NoPods,
}

/// The CRD as YAML, as `virus-scan-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> String {
    let crd = VirusScanPolicy::crd();
    let mut out = String::from("# Generated by `virus-scan-operator crd`; do not edit.\n");
    out.push_str(&serde_saphyr::to_string(&crd).unwrap_or_else(|e| {
        // Serialising our own static types cannot fail short of a bug in the schema types.
        panic!("CRD does not serialise: {e}")
    }));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crd_is_current() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../crds/virusscanpolicies.virusscan.aether-platform.io.yaml"
        );
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == crd_yaml(),
            "{path} is stale: run `make crds` (virus-scan-operator crd > {path})"
        );
    }

    #[test]
    fn defaults_fill_an_empty_spec() {
        let spec: VirusScanPolicySpec =
            serde_json::from_value(serde_json::json!({"selector": {}})).expect("spec");
        assert_eq!(spec.scan, ScanSettings::default());
        assert_eq!(spec.scan.infected_status_code, 406);
        assert!(spec.producer.native_sidecar);
        assert_eq!(spec.producer.port, 50051);
    }

    #[test]
    fn schema_carries_the_cel_rules() {
        let crd = serde_json::to_string(&VirusScanPolicy::crd()).expect("json");
        for needle in [
            "route names must be unique",
            "exactly one of pathPrefix, path and regex, or an httpRoute",
            "requires failureMode FailClosed",
            "fileThresholdMB must not exceed maxBodyMB",
            "400-599",
        ] {
            assert!(crd.contains(needle), "missing rule {needle}");
        }
    }
}
