//! The Helm chart on a real kube-apiserver: `helm lint`, `helm template | kubeconform
//! -strict` against JSON schemas taken from this API server's own OpenAPI document and the
//! CRD's schema, `manifests/install.yaml` current, `helm install` creating every object, and
//! the operator, run out of cluster as the chart's ServiceAccount (so its RBAC is what is
//! tested), patching the webhook's caBundle.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Api;
use serde_json::{Value, json};
use support::{CRD_FILE, EXAMPLES, Operator, eventually};
use virus_scanner_test_support::kube::ControlPlane;

const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../charts/virus-scanner");
const INSTALL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../manifests/install.yaml");
const RELEASE: &str = "vs";
const NAMESPACE: &str = "virus-scanner";

fn run(plane: &ControlPlane, binary: &str, args: &[&str]) -> String {
    let out = plane.command(binary).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{binary} {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Forbids properties a schema does not name (what `kubeconform -strict` means), and
/// accepts numbers where Kubernetes accepts int-or-string and quantities.
fn tighten(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            if map.get("format").and_then(Value::as_str) == Some("int-or-string")
                || map.get("x-kubernetes-int-or-string") == Some(&json!(true))
            {
                *schema = json!({"oneOf": [{"type": "string"}, {"type": "integer"}]});
                return;
            }
            let preserve = map.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
            if map.contains_key("properties")
                && !map.contains_key("additionalProperties")
                && !preserve
            {
                map.insert("additionalProperties".into(), json!(false));
            }
            for v in map.values_mut() {
                tighten(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(tighten),
        _ => {}
    }
}

/// One JSON schema per kind, `<kind>_<version>.json`, from the API server's OpenAPI v2
/// document (its `#/definitions/...` references resolve inside each file) and the CRD.
fn write_schemas(plane: &ControlPlane, dir: &Path) {
    let openapi: Value =
        serde_json::from_str(&plane.kubectl(&["get", "--raw", "/openapi/v2"])).unwrap();
    let mut definitions = openapi["definitions"].clone();
    tighten(&mut definitions);
    // Quantities are written as numbers or strings.
    definitions["io.k8s.apimachinery.pkg.api.resource.Quantity"] =
        json!({"oneOf": [{"type": "string"}, {"type": "number"}]});
    let mut written = 0;
    for (name, def) in definitions.as_object().unwrap() {
        let Some(gvks) = def["x-kubernetes-group-version-kind"].as_array() else {
            continue;
        };
        for gvk in gvks {
            let kind = gvk["kind"].as_str().unwrap().to_ascii_lowercase();
            let version = gvk["version"].as_str().unwrap();
            let file = dir.join(format!("{kind}_{version}.json"));
            let schema =
                json!({"$ref": format!("#/definitions/{name}"), "definitions": definitions});
            std::fs::write(file, schema.to_string()).unwrap();
            written += 1;
        }
    }
    assert!(written > 50, "only {written} schemas from the API server");
    let crd: Value = serde_saphyr::from_str(&std::fs::read_to_string(CRD_FILE).unwrap()).unwrap();
    let mut schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    tighten(&mut schema);
    // apiVersion, kind and metadata are implicit in a CRD's schema.
    schema["properties"]["metadata"] = json!({"type": "object"});
    schema["properties"]["apiVersion"] = json!({"type": "string"});
    schema["properties"]["kind"] = json!({"type": "string"});
    std::fs::write(
        dir.join("virusscanpolicy_v1alpha1.json"),
        schema.to_string(),
    )
    .unwrap();
}

fn kubeconform(plane: &ControlPlane, schemas: &Path, files: &[PathBuf]) -> (bool, String) {
    let location = format!(
        "{}/{{{{ .ResourceKind }}}}_{{{{ .ResourceAPIVersion }}}}.json",
        schemas.display()
    );
    let out = plane
        .command("kubeconform")
        .args(["-strict", "-summary", "-schema-location", &location])
        .args(files)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `manifests/install.yaml` as `make manifests` writes it.
fn render_install(plane: &ControlPlane) -> String {
    let rendered = run(
        plane,
        "helm",
        &[
            "template",
            RELEASE,
            CHART,
            "-n",
            NAMESPACE,
            "--include-crds",
            "--kube-version",
            "1.36.3",
        ],
    );
    format!(
        "# Generated by `make manifests` (helm template with default values); do not edit.\n\
         # kubectl apply --server-side -f manifests/install.yaml\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n{rendered}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_lints_validates_installs_and_its_operator_patches_the_ca_bundle() {
    let plane = tokio::task::spawn_blocking(ControlPlane::start)
        .await
        .unwrap();

    run(&plane, "helm", &["lint", "--strict", CHART]);
    // The chart's copy of the CRD is the generated one.
    assert_eq!(
        std::fs::read_to_string(format!(
            "{CHART}/crds/virusscanpolicies.virusscan.aether-platform.io.yaml"
        ))
        .unwrap(),
        std::fs::read_to_string(CRD_FILE).unwrap(),
        "charts/virus-scanner/crds is stale: run `make crds`"
    );
    let install = render_install(&plane);
    assert!(
        std::fs::read_to_string(INSTALL).unwrap_or_default() == install,
        "manifests/install.yaml is stale: run `make manifests`"
    );

    // kubeconform -strict on the chart (defaults and the other modes), the install
    // manifest and the examples.
    let dir = tempfile::tempdir().unwrap();
    let schemas = dir.path().join("schemas");
    std::fs::create_dir_all(&schemas).unwrap();
    write_schemas(&plane, &schemas);
    let mut files = vec![PathBuf::from(INSTALL)];
    for (name, sets) in [
        (
            "external-redis",
            vec![
                "redis.mode=external",
                "redis.external.host=redis.example",
                "redis.external.tls=true",
                "redis.external.passwordSecret.name=redis",
            ],
        ),
        (
            "hpa",
            vec![
                "consumer.autoscaling.enabled=true",
                "sharedVolumeClaim=spool",
                "networkPolicies.enabled=false",
            ],
        ),
    ] {
        let mut args = vec![
            "template",
            RELEASE,
            CHART,
            "-n",
            NAMESPACE,
            "--kube-version",
            "1.36.3",
        ];
        for s in &sets {
            args.extend(["--set", s]);
        }
        let path = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&path, run(&plane, "helm", &args)).unwrap();
        files.push(path);
    }
    for entry in std::fs::read_dir(EXAMPLES).unwrap() {
        files.push(entry.unwrap().path());
    }
    let (ok, report) = kubeconform(&plane, &schemas, &files);
    assert!(ok, "kubeconform refused:\n{report}");
    assert!(
        report.contains("Invalid: 0, Errors: 0, Skipped: 0"),
        "{report}"
    );
    // The schemas do refuse what is wrong.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(
        &broken,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec:\n  replicas: two\n  selector: {matchLabels: {a: b}}\n  template: {metadata: {labels: {a: b}}, spec: {containers: [{name: c, image: i, bogus: 1}]}}\n",
    )
    .unwrap();
    let bad_policy = dir.path().join("bad-policy.yaml");
    std::fs::write(
        &bad_policy,
        "apiVersion: virusscan.aether-platform.io/v1alpha1\nkind: VirusScanPolicy\nmetadata: {name: x}\nspec:\n  selector: {}\n  scan: {maxBodyMB: 0, surprise: true}\n",
    )
    .unwrap();
    for f in [&broken, &bad_policy] {
        let (ok, report) = kubeconform(&plane, &schemas, std::slice::from_ref(f));
        assert!(!ok, "kubeconform accepted {}:\n{report}", f.display());
    }
    // The chart's values are checked by values.schema.json.
    let out = plane
        .command("helm")
        .args(["template", RELEASE, CHART, "--set", "redis.mode=sideways"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/redis/mode"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // helm install creates every object.
    run(
        &plane,
        "helm",
        &[
            "install",
            RELEASE,
            CHART,
            "-n",
            NAMESPACE,
            "--create-namespace",
        ],
    );
    let fullname = format!("{RELEASE}-virus-scanner");
    for (kind, name, namespaced) in [
        (
            "crd",
            "virusscanpolicies.virusscan.aether-platform.io".to_owned(),
            false,
        ),
        ("deployment", format!("{fullname}-operator"), true),
        ("deployment", format!("{fullname}-consumer"), true),
        ("statefulset", format!("{fullname}-redis"), true),
        ("service", format!("{fullname}-webhook"), true),
        ("service", format!("{fullname}-redis"), true),
        ("poddisruptionbudget", format!("{fullname}-operator"), true),
        ("networkpolicy", format!("{fullname}-redis"), true),
        ("role", format!("{fullname}-operator"), true),
        ("clusterrole", format!("{fullname}-operator"), false),
        ("mutatingwebhookconfiguration", fullname.clone(), false),
    ] {
        let mut args = vec!["get", kind, name.as_str()];
        if namespaced {
            args.extend(["-n", NAMESPACE]);
        }
        run(&plane, "kubectl", &args);
    }

    // The operator, out of cluster but as the chart's ServiceAccount.
    let kubeconfig = dir.path().join("operator.kubeconfig");
    let admin = std::fs::read_to_string(plane.kubeconfig()).unwrap();
    let impersonating = admin.replace(
        "    client-key:",
        &format!(
            "    as: system:serviceaccount:{NAMESPACE}:{fullname}-operator\n    as-groups: [system:serviceaccounts, system:serviceaccounts:{NAMESPACE}, system:authenticated]\n    client-key:"
        ),
    );
    assert_ne!(admin, impersonating);
    std::fs::write(&kubeconfig, impersonating).unwrap();
    let whoami = plane
        .command("kubectl")
        .env("KUBECONFIG", &kubeconfig)
        .args([
            "auth",
            "whoami",
            "-o",
            "jsonpath={.status.userInfo.username}",
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&whoami.stdout),
        format!("system:serviceaccount:{NAMESPACE}:{fullname}-operator")
    );
    let operator = Operator::start_with(
        &plane,
        "chart-op",
        &[
            ("KUBECONFIG", kubeconfig.display().to_string()),
            ("POD_NAMESPACE", NAMESPACE.to_owned()),
            ("LEASE_NAME", format!("{fullname}-operator")),
            ("WEBHOOK_CONFIG_NAME", fullname.clone()),
            ("WEBHOOK_SECRET_NAME", format!("{fullname}-webhook-tls")),
            ("WEBHOOK_SERVICE", format!("{fullname}-webhook")),
        ],
    );
    let configs: Api<MutatingWebhookConfiguration> = Api::all(plane.client().await);
    eventually(
        Duration::from_secs(30),
        "caBundle patched by the operator",
        || async {
            configs
                .get(&fullname)
                .await
                .ok()
                .and_then(|c| c.webhooks?[0].client_config.ca_bundle.clone())
                .is_some()
        },
    )
    .await;
    eventually(Duration::from_secs(30), "operator leads", || async {
        operator.is_leader()
    })
    .await;
    // It reconciles a policy with the chart's permissions.
    plane.kubectl(&["create", "namespace", "tenant-a"]);
    plane.kubectl(&["apply", "-f", &format!("{EXAMPLES}/virusscanpolicy.yaml")]);
    eventually(
        Duration::from_secs(30),
        "policy reconciled as the ServiceAccount",
        || async {
            let out = plane.kubectl(&[
                "get",
                "vsp",
                "gateway",
                "-n",
                "tenant-a",
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            out == "True"
        },
    )
    .await;
    assert_eq!(
        operator.metric("virus_scan_operator_reconcile_errors_total"),
        0.0,
        "{}",
        operator.process.log_tail()
    );
}

/// `helm template` of the chart with `sets`: every object, by kind and name.
fn template(sets: &[&str]) -> Vec<Value> {
    let mut cmd =
        std::process::Command::new(virus_scanner_test_support::kube::k8s_bin_dir().join("helm"));
    cmd.args(["template", RELEASE, CHART, "-n", NAMESPACE]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = virus_scanner_test_support::run_checked(&mut cmd, "helm template");
    serde_saphyr::from_multiple::<Value>(&String::from_utf8_lossy(&out.stdout))
        .unwrap()
        .into_iter()
        .filter(|o| !o.is_null())
        .collect()
}

fn object<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn clamd_alerts_on_what_it_cannot_scan_and_its_limits_follow_the_values() {
    let fullname = format!("{RELEASE}-virus-scanner");
    for (sets, body_mb, scan_mb) in [
        (vec![], 100, 400),
        (vec!["consumer.maxScanSizeMB=250"], 250, 1000),
        (vec!["consumer.maxScanSizeMB=2000"], 2000, 4095),
    ] {
        let objects = template(&sets);
        let conf =
            object(&objects, "ConfigMap", &format!("{fullname}-clamd"))["data"]["clamd.conf"]
                .as_str()
                .unwrap()
                .to_owned();
        let settings: Vec<(&str, &str)> = conf
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| l.split_once(' ').unwrap())
            .collect();
        let setting = |key: &str| {
            let values: Vec<&str> = settings
                .iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| *v)
                .collect();
            assert_eq!(values.len(), 1, "{key} in\n{conf}");
            values[0].to_owned()
        };
        for alert in [
            "HeuristicAlerts",
            "AlertExceedsMax",
            "AlertEncrypted",
            "AlertEncryptedArchive",
            "AlertEncryptedDoc",
        ] {
            assert_eq!(setting(alert), "yes", "{sets:?}");
        }
        let megabytes = |key: &str| -> u64 {
            setting(key)
                .strip_suffix('M')
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{key} is not in MiB: {conf}"))
        };
        for limit in ["MaxFileSize", "StreamMaxLength", "PCREMaxFileSize"] {
            assert_eq!(megabytes(limit), body_mb, "{limit} {sets:?}");
        }
        assert_eq!(megabytes("MaxScanSize"), scan_mb, "{sets:?}");
        // The image's entrypoint waits for this socket before it declares clamd started.
        assert_eq!(setting("LocalSocket"), "/tmp/clamd.sock");
        assert_eq!(setting("TCPSocket"), "3310");

        let deployment = object(&objects, "Deployment", &format!("{fullname}-consumer"));
        let pod = &deployment["spec"]["template"];
        let container = |name: &str| {
            pod["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == name)
                .unwrap()
                .clone()
        };
        let consumer_env = container("consumer")["env"].clone();
        let max_scan = consumer_env
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "MAX_SCAN_SIZE_MB")
            .unwrap();
        assert_eq!(max_scan["value"], body_mb.to_string());
        let clamd = container("clamd");
        let mount = clamd["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["mountPath"] == "/etc/clamav/clamd.conf")
            .unwrap_or_else(|| panic!("clamd.conf not mounted: {clamd}"))
            .clone();
        assert_eq!(mount["subPath"], "clamd.conf");
        let volume = pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == mount["name"])
            .unwrap();
        assert_eq!(volume["configMap"]["name"], format!("{fullname}-clamd"));
        assert!(
            pod["metadata"]["annotations"]["checksum/clamd-conf"]
                .as_str()
                .is_some_and(|c| c.len() == 64),
            "a new clamd.conf must roll the pods"
        );
    }
}

/// A replica answers admission reviews only once it is ready, which it is only after its
/// policy cache has synced; and when no replica can answer, the API server refuses the pod.
#[test]
fn the_webhook_fails_closed_and_only_ready_replicas_serve_it() {
    let fullname = format!("{RELEASE}-virus-scanner");
    let objects = template(&[]);
    let config = object(&objects, "MutatingWebhookConfiguration", &fullname);
    for hook in config["webhooks"].as_array().unwrap() {
        assert_eq!(hook["failurePolicy"], "Fail", "{hook}");
    }
    let deployment = object(&objects, "Deployment", &format!("{fullname}-operator"));
    let operator = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(operator["readinessProbe"]["httpGet"]["path"], "/ready");
    let service = object(&objects, "Service", &format!("{fullname}-webhook"));
    assert!(
        service["spec"]["publishNotReadyAddresses"].is_null()
            || service["spec"]["publishNotReadyAddresses"] == false,
        "{service}"
    );
}

/// The env of a container, name to value (literal, or `secret/key` for a Secret reference).
fn env_of(container: &Value) -> std::collections::BTreeMap<String, String> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let value = match &e["valueFrom"]["secretKeyRef"] {
                Value::Null => e["value"].as_str().unwrap_or_default().to_owned(),
                r => format!(
                    "{}/{}",
                    r["name"].as_str().unwrap(),
                    r["key"].as_str().unwrap()
                ),
            };
            (e["name"].as_str().unwrap().to_owned(), value)
        })
        .collect()
}

#[test]
fn the_bundled_redis_serves_tls_to_users_only_and_only_injected_pods_reach_it() {
    let objects = template(&[]);
    let redis =
        &object(&objects, "StatefulSet", "vs-virus-scanner-redis")["spec"]["template"]["spec"];
    let args: Vec<&str> = redis["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let arg = |name: &str| {
        let i = args
            .iter()
            .position(|a| *a == name)
            .unwrap_or_else(|| panic!("no {name}"));
        args[i + 1]
    };
    // No plain port; TLS with the operator's certificate; users from the operator's ACL file.
    assert_eq!(arg("--port"), "0");
    assert_eq!(arg("--tls-port"), "6379");
    assert_eq!(arg("--aclfile"), "/etc/redis/acl/users.acl");
    let volumes = redis["volumes"].as_array().unwrap();
    let secret_of = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))["secret"]["secretName"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert_eq!(secret_of("tls"), "vs-virus-scanner-redis-tls");
    assert_eq!(secret_of("acl"), "vs-virus-scanner-redis-auth");

    let consumer = &object(&objects, "Deployment", "vs-virus-scanner-consumer")["spec"]["template"]
        ["spec"]["containers"][0];
    let env = env_of(consumer);
    assert_eq!(env["REDIS_TLS"], "true");
    assert_eq!(env["REDIS_USERNAME"], "vs-consumer");
    assert_eq!(
        env["REDIS_PASSWORD"],
        "vs-virus-scanner-redis-auth/consumer-password"
    );
    assert_eq!(env["REDIS_CA_FILE"], "/etc/virus-scanner/redis-ca/ca.crt");

    let operator = &object(&objects, "Deployment", "vs-virus-scanner-operator")["spec"]["template"]
        ["spec"]["containers"][0];
    let env = env_of(operator);
    assert_eq!(env["TENANT_REDIS_USERS"], "true");
    assert_eq!(env["DEFAULT_REDIS_TLS"], "true");
    assert_eq!(env["REDIS_AUTH_SECRET"], "vs-virus-scanner-redis-auth");
    assert_eq!(env["REDIS_TLS_SECRET"], "vs-virus-scanner-redis-tls");
    // The operator's settings parse and validate as the chart gives them.
    let vars: Vec<(String, String)> = env.into_iter().collect();
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let cli =
        virus_scan_operator::Cli::parse_from(["virus-scan-operator"], vars.as_slice()).unwrap();
    cli.run.validate().unwrap();
    assert!(cli.run.tenant_users().unwrap().unwrap().backbone.is_some());

    // Redis: from the consumers, the operator and injected pods of opted-in namespaces only.
    let policy = &object(&objects, "NetworkPolicy", "vs-virus-scanner-redis")["spec"];
    let from = policy["ingress"][0]["from"].as_array().unwrap();
    assert_eq!(from.len(), 3, "{from:?}");
    let tenants = &from[2];
    assert_eq!(
        tenants["namespaceSelector"]["matchLabels"]["virusscan.aether-platform.io/injection"],
        "enabled"
    );
    assert_eq!(
        tenants["podSelector"]["matchLabels"][virus_scan_operator::inject::LABEL_SIDECAR],
        "injected"
    );
    // The webhook from the API server's range, when given.
    let objects = template(&["webhook.allowedSourceCIDRs={10.1.0.0/16}"]);
    let policy = &object(&objects, "NetworkPolicy", "vs-virus-scanner-operator")["spec"];
    assert_eq!(
        policy["ingress"][0]["from"][0]["ipBlock"]["cidr"],
        "10.1.0.0/16"
    );
    assert_eq!(policy["ingress"][0]["ports"][0]["port"], 9443);

    // The consumer reaches its clamd's Unix socket through an emptyDir they share (bodies by
    // descriptor), where clamd.conf puts it.
    let pod =
        &object(&objects, "Deployment", "vs-virus-scanner-consumer")["spec"]["template"]["spec"];
    let mount_of = |container: &Value| {
        container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "clamd-socket")
            .map(|m| m["mountPath"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        env_of(&pod["containers"][0])["CLAMD_SOCKET"],
        "/run/clamd/clamd.sock"
    );
    assert_eq!(
        mount_of(&pod["containers"][0]).as_deref(),
        Some("/run/clamd")
    );
    assert_eq!(mount_of(&pod["containers"][1]).as_deref(), Some("/tmp"));
    let conf = object(&objects, "ConfigMap", "vs-virus-scanner-clamd")["data"]["clamd.conf"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(conf.contains("\nLocalSocket /tmp/clamd.sock\n"), "{conf}");

    // Without tenant users, no TLS and no credentials (one trusted tenant).
    let objects = template(&["redis.tenantUsers=false"]);
    let consumer = &object(&objects, "Deployment", "vs-virus-scanner-consumer")["spec"]["template"]
        ["spec"]["containers"][0];
    assert!(!env_of(consumer).contains_key("REDIS_USERNAME"));
}
