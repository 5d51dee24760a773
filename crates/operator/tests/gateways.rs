//! Envoy Gateway and Istio: the objects the controller writes for a policy, against the
//! gateways' own CRDs at pinned versions (`hack/gateway-crds.sh`, from their Go modules), so
//! the API server checks them with the gateways' schemas and CEL rules; a policy edit
//! updates them, and with the garbage collector running, deleting the policy removes them.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use support::{Operator, eventually, gateway_crds, plane_with_crd};
use virus_scan_operator::crd::{GatewayState, VirusScanPolicy};
use virus_scanner_test_support::kube::ControlPlane;

const NS: &str = "tenant-gw";

/// kube-controller-manager running only the garbage collector, so that owner references
/// take effect as in a cluster.
struct GarbageCollector(Child);

impl GarbageCollector {
    fn start(plane: &ControlPlane) -> GarbageCollector {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(plane.bin_dir().join("kube-controller-manager"))
            .arg(format!("--kubeconfig={}", plane.kubeconfig().display()))
            .args([
                "--controllers=garbagecollector",
                "--leader-elect=false",
                "--secure-port=0",
            ])
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        GarbageCollector(child)
    }
}

impl Drop for GarbageCollector {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn api(
    client: &Client,
    group: &str,
    version: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Api::namespaced_with(
        client.clone(),
        NS,
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

struct Apis {
    extension_policies: Api<DynamicObject>,
    backends: Api<DynamicObject>,
    client_traffic: Api<DynamicObject>,
    envoy_filters: Api<DynamicObject>,
}

impl Apis {
    fn new(client: &Client) -> Apis {
        let eg = "gateway.envoyproxy.io";
        Apis {
            extension_policies: api(
                client,
                eg,
                "v1alpha1",
                "EnvoyExtensionPolicy",
                "envoyextensionpolicies",
            ),
            backends: api(client, eg, "v1alpha1", "Backend", "backends"),
            client_traffic: api(
                client,
                eg,
                "v1alpha1",
                "ClientTrafficPolicy",
                "clienttrafficpolicies",
            ),
            envoy_filters: api(
                client,
                "networking.istio.io",
                "v1alpha3",
                "EnvoyFilter",
                "envoyfilters",
            ),
        }
    }
}

async fn names(api: &Api<DynamicObject>, policy: &str) -> Vec<String> {
    let list = api
        .list(
            &ListParams::default().labels(&format!("virusscan.aether-platform.io/policy={policy}")),
        )
        .await
        .unwrap();
    let mut names: Vec<String> = list.items.iter().map(|o| o.name_any()).collect();
    names.sort();
    names
}

fn condition(policy: &VirusScanPolicy, type_: &str) -> Option<(String, String, String)> {
    let c = policy
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

/// The policy once its status describes its current generation.
async fn reconciled(policies: &Api<VirusScanPolicy>, name: &str) -> VirusScanPolicy {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let p = policies.get(name).await.unwrap();
        let current = p
            .status
            .as_ref()
            .is_some_and(|s| s.observed_generation == p.metadata.generation);
        if current {
            return p;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "policy {name} not reconciled: {:?}",
            p.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn spec_of(object: &DynamicObject) -> &Value {
    &object.data["spec"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_objects_pass_the_gateways_schemas_follow_edits_and_go_with_the_policy() {
    let crds = gateway_crds();
    let plane = tokio::task::spawn_blocking(plane_with_crd).await.unwrap();
    for file in ["envoy-gateway.yaml", "istio.yaml"] {
        let path = crds.join(file).display().to_string();
        plane.kubectl(&["apply", "--server-side", "-f", &path]);
    }
    for crd in [
        "envoyextensionpolicies.gateway.envoyproxy.io",
        "backends.gateway.envoyproxy.io",
        "clienttrafficpolicies.gateway.envoyproxy.io",
        "envoyfilters.networking.istio.io",
    ] {
        plane.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            &format!("crd/{crd}"),
        ]);
    }
    plane.kubectl(&["create", "namespace", NS]);
    let _gc = GarbageCollector::start(&plane);
    let client = plane.client().await;
    let apis = Apis::new(&client);
    let policies: Api<VirusScanPolicy> = Api::namespaced(client.clone(), NS);
    let operator = Operator::start(&plane, "op-0");

    // Envoy Gateway, derived from the selector's label: Buffered, two opted-out rules.
    let web: VirusScanPolicy = serde_json::from_value(json!({
        "apiVersion": "virusscan.aether-platform.io/v1alpha1",
        "kind": "VirusScanPolicy",
        "metadata": {"name": "web", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"gateway.envoyproxy.io/owning-gateway-name": "web"}},
            "scan": {"maxBodyMB": 20},
            "producer": {"transport": "UnixSocket"},
            "routes": [
                {"name": "health", "path": "/healthz", "httpRoute": {"name": "site", "sectionName": "health"}},
                {"name": "legacy", "httpRoute": {"name": "legacy"}}
            ]
        }
    }))
    .unwrap();
    let web = policies.create(&PostParams::default(), &web).await.unwrap();
    let uid = web.metadata.uid.clone().unwrap();
    let p = reconciled(&policies, "web").await;
    let generated = condition(&p, "ConfigGenerated").unwrap();
    assert_eq!(
        (generated.0.as_str(), generated.1.as_str()),
        ("True", "GatewayConfigApplied"),
        "the gateway's API server refused an object: {generated:?}\n{}",
        operator.process.log_tail()
    );
    let gateway = condition(&p, "Gateway").unwrap();
    assert_eq!(gateway.1, "EnvoyGatewayLabels", "{gateway:?}");

    let skip_health = virus_scan_operator::gateways::envoy_gateway::opt_out_name("web", "health");
    let skip_legacy = virus_scan_operator::gateways::envoy_gateway::opt_out_name("web", "legacy");
    let mut expected = vec![
        "vsp-web".to_owned(),
        skip_health.clone(),
        skip_legacy.clone(),
    ];
    expected.sort();
    assert_eq!(names(&apis.extension_policies, "web").await, expected);
    let eep = apis.extension_policies.get("vsp-web").await.unwrap();
    let owner = &eep.owner_references()[0];
    assert_eq!(
        (owner.uid.as_str(), owner.controller),
        (uid.as_str(), Some(true))
    );
    let ext = &spec_of(&eep)["extProc"][0];
    assert_eq!(ext["failOpen"], false);
    assert_eq!(ext["messageTimeout"], "35s");
    assert_eq!(ext["processingMode"]["request"]["body"], "Buffered");
    assert_eq!(spec_of(&eep)["targetRefs"][0]["name"], "web");
    let skip = apis.extension_policies.get(&skip_health).await.unwrap();
    assert_eq!(spec_of(&skip)["targetRefs"][0]["sectionName"], "health");
    assert!(spec_of(&skip).get("extProc").is_none());
    let backend = apis.backends.get("vsp-web-producer").await.unwrap();
    assert_eq!(
        spec_of(&backend)["endpoints"][0]["unix"]["path"],
        "/var/run/virus-scanner/producer.sock"
    );
    let ctp = apis.client_traffic.get("vsp-web").await.unwrap();
    assert_eq!(spec_of(&ctp)["connection"]["bufferLimit"], "20544Ki");

    // The server enforces Envoy Gateway's CEL rules: the same extension failing open in
    // FullDuplexStreamed mode is refused, so the objects above passed them.
    let mut open = eep.clone();
    open.metadata = kube::api::ObjectMeta {
        name: Some("fail-open".to_owned()),
        namespace: Some(NS.to_owned()),
        ..Default::default()
    };
    open.data["spec"]["extProc"][0]["failOpen"] = json!(true);
    open.data["spec"]["extProc"][0]["processingMode"]["request"]["body"] =
        json!("FullDuplexStreamed");
    let refused = apis
        .extension_policies
        .create(&PostParams::default(), &open)
        .await
        .expect_err("CEL rule");
    assert!(
        refused.to_string().contains("FailOpen must be false"),
        "{refused}"
    );

    // No proxy of the Gateway runs yet: listed, not protected.
    let status = p.status.clone().unwrap();
    assert_eq!(status.gateways.len(), 1, "{status:?}");
    assert_eq!(
        (status.gateways[0].name.as_str(), status.gateways[0].state),
        ("gateway/web", GatewayState::NoPods)
    );
    assert_eq!(status.protected_gateways.as_deref(), Some("0/1"));
    assert_eq!(condition(&p, "Protected").unwrap().1, "GatewaysUnprotected");

    // A tenant's own EnvoyExtensionPolicy on an HTTPRoute of the Gateway replaces ours on
    // that route (Envoy Gateway applies the most specific one): the Gateway is Overridden,
    // the message names it. Ours on the opted-out rules are not overrides.
    let routes = api(
        &client,
        "gateway.networking.k8s.io",
        "v1",
        "HTTPRoute",
        "httproutes",
    );
    for (route, gateway) in [("shop", "web"), ("elsewhere", "other")] {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": route, "namespace": NS},
            "spec": {
                "parentRefs": [{"name": gateway}],
                "rules": [{"backendRefs": [{"name": "shop", "port": 80}]}]
            }
        }))
        .unwrap();
        routes
            .create(&PostParams::default(), &object)
            .await
            .unwrap();
    }
    let theirs: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.envoyproxy.io/v1alpha1",
        "kind": "EnvoyExtensionPolicy",
        "metadata": {"name": "tenant-lua", "namespace": NS},
        "spec": {
            "targetRefs": [
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "shop"},
                {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "elsewhere"}
            ],
            "lua": [{"type": "Inline", "inline": "function envoy_on_request(h) end"}]
        }
    }))
    .unwrap();
    apis.extension_policies
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    // A policy edit that changes nothing but makes the controller look again.
    let touch_policy = |name: &'static str, value: &'static str| {
        let policies = policies.clone();
        async move {
            policies
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {"test/touch": value}}})),
                )
                .await
                .unwrap();
        }
    };
    touch_policy("web", "1").await;
    eventually(
        Duration::from_secs(30),
        "the tenant's route policy shows as an override",
        || async {
            let p = policies.get("web").await.unwrap();
            p.status.is_some_and(|s| {
                s.gateways.len() == 1
                    && s.gateways[0].state == GatewayState::Overridden
                    && s.gateways[0].message.contains(&format!(
                        "EnvoyExtensionPolicy {NS}/tenant-lua on HTTPRoute {NS}/shop"
                    ))
                    && !s.gateways[0].message.contains("elsewhere")
            })
        },
    )
    .await;
    // Merged into ours instead of replacing it: no longer an override.
    apis.extension_policies
        .patch(
            "tenant-lua",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"mergeType": "StrategicMerge"}})),
        )
        .await
        .unwrap();
    touch_policy("web", "2").await;
    eventually(
        Duration::from_secs(30),
        "a merging route policy is not an override",
        || async {
            let p = policies.get("web").await.unwrap();
            p.status.is_some_and(|s| {
                s.gateways.len() == 1 && s.gateways[0].state == GatewayState::NoPods
            })
        },
    )
    .await;

    // A route of another namespace attached to the Gateway, with that namespace's own
    // EnvoyExtensionPolicy on it: its traffic through this Gateway is not scanned either.
    plane.kubectl(&["create", "namespace", "tenant-other"]);
    let other_routes: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "tenant-other",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "HTTPRoute"),
            "httproutes",
        ),
    );
    let borrowed: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "borrowed", "namespace": "tenant-other"},
        "spec": {
            "parentRefs": [{"name": "web", "namespace": NS}],
            "rules": [{"backendRefs": [{"name": "shop", "port": 80}]}]
        }
    }))
    .unwrap();
    other_routes
        .create(&PostParams::default(), &borrowed)
        .await
        .unwrap();
    let other_policies: Api<DynamicObject> = Api::namespaced_with(
        client.clone(),
        "tenant-other",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.envoyproxy.io", "v1alpha1", "EnvoyExtensionPolicy"),
            "envoyextensionpolicies",
        ),
    );
    let mut theirs_elsewhere = theirs.clone();
    theirs_elsewhere.metadata = kube::api::ObjectMeta {
        name: Some("other-lua".to_owned()),
        namespace: Some("tenant-other".to_owned()),
        ..Default::default()
    };
    theirs_elsewhere.data["spec"]["targetRefs"] = json!([
        {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": "borrowed"}
    ]);
    other_policies
        .create(&PostParams::default(), &theirs_elsewhere)
        .await
        .unwrap();
    touch_policy("web", "3").await;
    eventually(
        Duration::from_secs(30),
        "a route policy of another namespace shows as an override",
        || async {
            let p = policies.get("web").await.unwrap();
            p.status.is_some_and(|s| {
                s.gateways.len() == 1
                    && s.gateways[0].state == GatewayState::Overridden
                    && s.gateways[0].message.contains(
                        "EnvoyExtensionPolicy tenant-other/other-lua on HTTPRoute tenant-other/borrowed",
                    )
            })
        },
    )
    .await;
    other_policies
        .delete("other-lua", &DeleteParams::default())
        .await
        .unwrap();
    touch_policy("web", "4").await;
    eventually(Duration::from_secs(30), "the override is gone", || async {
        let p = policies.get("web").await.unwrap();
        p.status
            .is_some_and(|s| s.gateways.len() == 1 && s.gateways[0].state == GatewayState::NoPods)
    })
    .await;

    // An edit: streamed, a shorter timeout, one opt-out fewer.
    policies
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "scan": {"mode": "FullDuplexStreamed", "timeoutSeconds": 10},
                "routes": [{"name": "health", "path": "/healthz", "httpRoute": {"name": "site", "sectionName": "health"}}]
            }})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the edit reaches the EnvoyExtensionPolicy",
        || async {
            let eep = apis.extension_policies.get("vsp-web").await.unwrap();
            let ext = &spec_of(&eep)["extProc"][0];
            ext["messageTimeout"] == "15s"
                && ext["processingMode"]["response"]["body"] == "FullDuplexStreamed"
        },
    )
    .await;
    eventually(
        Duration::from_secs(30),
        "what the edit dropped is removed",
        || async {
            names(&apis.client_traffic, "web").await.is_empty()
                && names(&apis.extension_policies, "web").await
                    == ["vsp-web".to_owned(), skip_health.clone()]
        },
    )
    .await;
    let p = reconciled(&policies, "web").await;
    assert_eq!(
        condition(&p, "ConfigGenerated").unwrap().1,
        "GatewayConfigApplied"
    );

    // Istio, derived from the selector's label.
    let mesh: VirusScanPolicy = serde_json::from_value(json!({
        "apiVersion": "virusscan.aether-platform.io/v1alpha1",
        "kind": "VirusScanPolicy",
        "metadata": {"name": "mesh", "namespace": NS},
        "spec": {
            "selector": {"matchLabels": {"istio": "ingressgateway"}},
            "routes": [{"name": "health", "path": "/healthz"}]
        }
    }))
    .unwrap();
    policies
        .create(&PostParams::default(), &mesh)
        .await
        .unwrap();
    let p = reconciled(&policies, "mesh").await;
    let generated = condition(&p, "ConfigGenerated").unwrap();
    assert_eq!(
        (generated.0.as_str(), generated.1.as_str()),
        ("True", "GatewayConfigApplied"),
        "{generated:?}"
    );
    assert_eq!(condition(&p, "Gateway").unwrap().1, "IstioLabels");
    let filter = apis.envoy_filters.get("vsp-mesh").await.unwrap();
    assert_eq!(
        spec_of(&filter)["workloadSelector"]["labels"]["istio"],
        "ingressgateway"
    );
    let patches = spec_of(&filter)["configPatches"].as_array().unwrap();
    assert!(patches.iter().any(|p| p["applyTo"] == "HTTP_ROUTE"));
    assert!(
        patches
            .iter()
            .filter(|p| p["applyTo"] == "HTTP_FILTER")
            .all(|p| p["patch"]["value"]["typed_config"]["failure_mode_allow"] == false)
    );
    assert!(names(&apis.extension_policies, "mesh").await.is_empty());

    // Istio reports nothing on an EnvoyFilter: a tenant's own filter that removes ext_proc
    // from the gateway (in the policy's namespace, or in Istio's root namespace, which
    // applies everywhere) is read from its patches and named in the gateway's status; one
    // that only adds a Lua filter is not.
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let gateway_pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "istio-gw", "labels": {"istio": "ingressgateway"}},
        "spec": {"containers": [{"name": "istio-proxy", "image": "istio/proxyv2:1.28.0"}]}
    }))
    .unwrap();
    pods.create(&PostParams::default(), &gateway_pod)
        .await
        .unwrap();
    plane.kubectl(&["create", "namespace", "istio-system"]);
    let envoy_filter = |namespace: &str, name: &str, selector: Value, patch: Value| {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "networking.istio.io/v1alpha3",
            "kind": "EnvoyFilter",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"workloadSelector": {"labels": selector}, "configPatches": [patch]}
        }))
        .unwrap();
        let gvk = GroupVersionKind::gvk("networking.istio.io", "v1alpha3", "EnvoyFilter");
        let api: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            namespace,
            &ApiResource::from_gvk_with_plural(&gvk, "envoyfilters"),
        );
        async move { api.create(&PostParams::default(), &object).await.unwrap() }
    };
    let remove = json!({
        "applyTo": "HTTP_FILTER",
        "match": {"context": "GATEWAY", "listener": {"filterChain": {"filter": {
            "name": "envoy.filters.network.http_connection_manager",
            "subFilter": {"name": "envoy.filters.http.ext_proc"}
        }}}},
        "patch": {"operation": "REMOVE"}
    });
    let lua = json!({
        "applyTo": "HTTP_FILTER",
        "match": {"context": "GATEWAY"},
        "patch": {"operation": "INSERT_BEFORE", "value": {"name": "envoy.filters.http.lua"}}
    });
    envoy_filter(NS, "tenant-lua", json!({"istio": "ingressgateway"}), lua).await;
    envoy_filter(
        NS,
        "tenant-remove",
        json!({"istio": "ingressgateway"}),
        remove.clone(),
    )
    .await;
    envoy_filter(
        "istio-system",
        "mesh-wide",
        json!({"istio": "ingressgateway"}),
        remove,
    )
    .await;
    touch_policy("mesh", "1").await;
    eventually(
        Duration::from_secs(30),
        "the tenant's and the root namespace's EnvoyFilters show as overrides",
        || async {
            let p = policies.get("mesh").await.unwrap();
            p.status.is_some_and(|s| {
                s.gateways.iter().any(|g| {
                    g.name == "pod/istio-gw"
                        && g.message.contains(&format!(
                            "EnvoyFilter {NS}/tenant-remove REMOVEs envoy.filters.http.ext_proc"
                        ))
                        && g.message.contains("EnvoyFilter istio-system/mesh-wide")
                        && !g.message.contains("tenant-lua")
                        && !g.message.contains("vsp-mesh")
                })
            })
        },
    )
    .await;

    // Pinned to another gateway kind, the policy's objects of the old kind go.
    policies
        .patch(
            "mesh",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "gateway": "EnvoyGateway",
                "envoyGateway": {"gatewayName": "mesh"},
                "producer": {"transport": "UnixSocket"}
            }})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "the EnvoyFilter gives way to Envoy Gateway's objects",
        || async {
            names(&apis.envoy_filters, "mesh").await.is_empty()
                && names(&apis.extension_policies, "mesh").await == ["vsp-mesh".to_owned()]
        },
    )
    .await;

    // Back to plain Envoy: every gateway object of the policy goes, the ConfigMap stays.
    policies
        .patch(
            "mesh",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"gateway": "Envoy"}})),
        )
        .await
        .unwrap();
    eventually(
        Duration::from_secs(30),
        "plain Envoy keeps no gateway objects",
        || async {
            names(&apis.extension_policies, "mesh").await.is_empty()
                && names(&apis.backends, "mesh").await.is_empty()
        },
    )
    .await;
    let p = reconciled(&policies, "mesh").await;
    assert_eq!(condition(&p, "ConfigGenerated").unwrap().1, "Generated");
    assert_eq!(condition(&p, "Gateway").unwrap().1, "Specified");

    // Deleting a policy removes its objects (owner references, garbage collector).
    policies
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the deleted policy's objects are collected",
        || async {
            names(&apis.extension_policies, "web").await.is_empty()
                && names(&apis.backends, "web").await.is_empty()
        },
    )
    .await;
    drop(operator);
}
