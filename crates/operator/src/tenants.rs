//! A Redis user per tenant. For every namespace with a VirusScanPolicy on the shared Redis,
//! the operator keeps a Secret `virus-scanner-redis-<namespace>` (username, a generated password, the CA
//! of Redis's TLS certificate) and the ACL user it names, with the rules of
//! [`virus_scanner_queue::acl::tenant_rules`]; the injector points the sidecar at that Secret.
//! It also keeps the consumers' user. Users are re-applied on every pass, so a Redis that
//! restarted without its ACLs has them back within one period. A namespace without policies
//! loses its user (its Secret goes with its policies, by owner references). Deleting the
//! Secret rotates the password: a new one is generated and applied; pods started with the old
//! one fail closed when they reconnect, until they are restarted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ListParams, ObjectMeta, PostParams};
use kube::{Resource, ResourceExt};
use virus_scanner_queue::{RedisConfig, acl};

use crate::crd::VirusScanPolicy;

/// The Secret of a tenant's Redis credentials, named by the injector which points the
/// sidecar at it.
pub use crate::inject::{SECRET_NAME, secret_name};

/// The label on a copy of a tenant's Secret in Envoy Gateway's namespace: the tenant.
pub const TENANT_LABEL: &str = "virusscan.aether-platform.io/tenant";
pub const USERNAME_KEY: &str = "username";
pub const PASSWORD_KEY: &str = "password";
pub const CA_KEY: &str = "ca.crt";

/// What the operator needs to keep the users.
#[derive(Debug, Clone)]
pub struct TenantUsers {
    /// The operator's own (administrative) connection to the shared Redis.
    pub redis: RedisConfig,
    pub prefix: String,
    /// The CA tenants verify Redis's certificate with, copied into their Secret.
    pub ca_file: Option<PathBuf>,
    /// The consumers' user and password, kept with the consumers' rules.
    pub consumer: Option<(String, String)>,
    pub legacy_queue: String,
    pub legacy_result_prefix: String,
    pub period: Duration,
    /// The bundled Redis's own credentials and certificate, kept by the operator.
    pub backbone: Option<Backbone>,
    /// Where Envoy Gateway runs the proxies of Gateways in its default deploy mode: tenants
    /// with Envoy Gateway policies get a copy of their Secret there, for the sidecars of their
    /// proxies (no owner references across namespaces: a copy outlives its tenant's user,
    /// which the operator removes, so it opens nothing).
    pub envoy_gateway_namespace: Option<String>,
}

/// The bundled Redis's secrets, in the operator's namespace: one with the operator's and the
/// consumers' passwords and the ACL file Redis starts with (the default user off, the operator
/// an administrator), one with Redis's TLS certificate from a CA the operator made. The
/// chart mounts them into Redis and the consumers; the operator reads them through the API.
#[derive(Debug, Clone)]
pub struct Backbone {
    pub namespace: String,
    pub auth_secret: String,
    pub admin_user: String,
    pub consumer_user: String,
    pub tls: crate::certs::ManagedCert,
}

pub const OPERATOR_PASSWORD_KEY: &str = "operator-password";
pub const CONSUMER_PASSWORD_KEY: &str = "consumer-password";
pub const ACL_FILE_KEY: &str = "users.acl";

/// Keeps the users until `stop` resolves.
pub async fn run(
    client: kube::Client,
    settings: TenantUsers,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    loop {
        if let Err(e) = reconcile(&client, &settings).await {
            tracing::warn!(error = %e, "cannot keep the tenants' Redis users; trying again");
        }
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(settings.period) => {}
        }
    }
}

/// One pass: every tenant namespace has its Secret and user, the consumers have theirs, and
/// tenants without policies have none.
pub async fn reconcile(
    client: &kube::Client,
    settings: &TenantUsers,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let policies = Api::<VirusScanPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    // Policies with a Redis of their own bring their own credentials.
    let mut tenants: BTreeMap<String, Vec<&VirusScanPolicy>> = BTreeMap::new();
    for p in policies.items.iter().filter(|p| p.spec.redis.is_none()) {
        if let Some(ns) = p.namespace() {
            tenants.entry(ns).or_default().push(p);
        }
    }
    let mut redis = settings.redis.clone();
    let mut consumer = settings.consumer.clone();
    let mut ca = match &settings.ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| format!("cannot read the Redis CA {}: {e}", path.display()))?,
        ),
        None => None,
    };
    if let Some(b) = &settings.backbone {
        let (admin, consumer_password) = ensure_backbone_auth(client, b).await?;
        let tls = crate::certs::ensure_secret(client, &b.tls).await?;
        let pem = tls
            .data
            .as_ref()
            .and_then(|d| d.get("ca.crt"))
            .map(|b| b.0.clone())
            .ok_or("the Redis certificate Secret has no ca.crt")?;
        redis.username = Some(b.admin_user.clone());
        redis.password = Some(admin);
        redis.ca_pem = Some(pem.clone());
        ca = Some(pem);
        consumer = Some((b.consumer_user.clone(), consumer_password));
    }
    let mut conn = redis.client()?.get_multiplexed_async_connection().await?;
    if let Some((user, password)) = &consumer {
        let rules = acl::consumer_rules(
            &settings.prefix,
            &settings.legacy_queue,
            &settings.legacy_result_prefix,
        );
        acl::set_user(&mut conn, user, password, &rules).await?;
    }
    for (namespace, owners) in &tenants {
        let password =
            ensure_secret(client, namespace, namespace, owners, ca.as_deref(), None).await?;
        let envoy_gateway = owners.iter().any(|p| {
            crate::gateways::detect(&p.spec, []).kind == crate::crd::GatewayKind::EnvoyGateway
                || p.status.as_ref().and_then(|s| s.gateway)
                    == Some(crate::crd::GatewayKind::EnvoyGateway)
        });
        if let (true, Some(eg)) = (envoy_gateway, &settings.envoy_gateway_namespace)
            && eg != namespace
        {
            ensure_secret(client, eg, namespace, &[], ca.as_deref(), Some(&password)).await?;
        }
        acl::provision_tenant(&mut conn, &settings.prefix, namespace, &password).await?;
    }
    let wanted: BTreeSet<&String> = tenants.keys().collect();
    for tenant in acl::provisioned_tenants(&mut conn).await? {
        if !wanted.contains(&tenant) {
            tracing::info!(
                tenant,
                "removing the Redis user of a namespace without policies"
            );
            acl::remove_tenant(&mut conn, &settings.prefix, &tenant).await?;
        }
    }
    Ok(())
}

/// The tenant's password: from its Secret, or a new one in a new Secret owned by the
/// namespace's policies. The CA and the owners are brought up to date.
async fn ensure_secret(
    client: &kube::Client,
    in_namespace: &str,
    namespace: &str,
    owners: &[&VirusScanPolicy],
    ca: Option<&[u8]>,
    copy_of: Option<&str>,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let name = secret_name(namespace);
    let api = Api::<Secret>::namespaced(client.clone(), in_namespace);
    let owner_refs: Vec<OwnerReference> = owners
        .iter()
        .filter_map(|p| p.controller_owner_ref(&()))
        .map(|mut r| {
            r.controller = Some(false);
            r
        })
        .collect();
    let mut data = BTreeMap::new();
    data.insert(
        USERNAME_KEY.to_owned(),
        ByteString(acl::tenant_user(namespace).into_bytes()),
    );
    if let Some(ca) = ca {
        data.insert(CA_KEY.to_owned(), ByteString(ca.to_vec()));
    }
    match api.get_opt(&name).await? {
        Some(mut secret) => {
            let current = secret.data.get_or_insert_with(BTreeMap::new);
            let password = match (copy_of, current.get(PASSWORD_KEY)) {
                (Some(p), _) => p.to_owned(),
                (None, Some(p)) if !p.0.is_empty() => String::from_utf8(p.0.clone())
                    .map_err(|_| format!("{in_namespace}/{name}: the password is not UTF-8"))?,
                // Emptied by hand: a new password, as if the Secret had been deleted.
                _ => new_password()?,
            };
            data.insert(
                PASSWORD_KEY.to_owned(),
                ByteString(password.clone().into_bytes()),
            );
            let owner_refs = (!owner_refs.is_empty()).then_some(owner_refs);
            let owners_differ = secret.metadata.owner_references != owner_refs;
            if *current != data || owners_differ {
                *current = data;
                secret.metadata.owner_references = owner_refs;
                secret.metadata.managed_fields = None;
                api.replace(&name, &PostParams::default(), &secret).await?;
            }
            Ok(password)
        }
        None => {
            let password = match copy_of {
                Some(p) => p.to_owned(),
                None => new_password()?,
            };
            data.insert(
                PASSWORD_KEY.to_owned(),
                ByteString(password.clone().into_bytes()),
            );
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(in_namespace.to_owned()),
                    owner_references: (!owner_refs.is_empty()).then_some(owner_refs),
                    labels: Some(BTreeMap::from([
                        (
                            "app.kubernetes.io/managed-by".to_owned(),
                            "virus-scan-operator".to_owned(),
                        ),
                        (TENANT_LABEL.to_owned(), namespace.to_owned()),
                    ])),
                    ..ObjectMeta::default()
                },
                data: Some(data),
                ..Secret::default()
            };
            api.create(&PostParams::default(), &secret).await?;
            tracing::info!(
                namespace,
                in_namespace,
                "wrote the tenant's Redis credentials"
            );
            Ok(password)
        }
    }
}

/// The operator's and the consumers' passwords, from the backbone's Secret or new in a new one.
async fn ensure_backbone_auth(
    client: &kube::Client,
    b: &Backbone,
) -> Result<(String, String), Box<dyn std::error::Error + Send + Sync>> {
    let api = Api::<Secret>::namespaced(client.clone(), &b.namespace);
    let read = |secret: &Secret, key: &str| {
        secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .filter(|v| !v.is_empty())
    };
    if let Some(secret) = api.get_opt(&b.auth_secret).await?
        && let (Some(admin), Some(consumer)) = (
            read(&secret, OPERATOR_PASSWORD_KEY),
            read(&secret, CONSUMER_PASSWORD_KEY),
        )
    {
        return Ok((admin, consumer));
    }
    let (admin, consumer) = (new_password()?, new_password()?);
    let acl_file = format!(
        "user default off\nuser {} on >{admin} ~* &* +@all\n",
        b.admin_user
    );
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(b.auth_secret.clone()),
            namespace: Some(b.namespace.clone()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                "virus-scan-operator".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (
                OPERATOR_PASSWORD_KEY.to_owned(),
                ByteString(admin.clone().into_bytes()),
            ),
            (
                CONSUMER_PASSWORD_KEY.to_owned(),
                ByteString(consumer.clone().into_bytes()),
            ),
            (ACL_FILE_KEY.to_owned(), ByteString(acl_file.into_bytes())),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = b.auth_secret, "created the Redis credentials");
            Ok((admin, consumer))
        }
        // Another replica got there first: take what it wrote.
        Err(kube::Error::Api(e)) if e.code == 409 => {
            let secret = api.get(&b.auth_secret).await?;
            match (
                read(&secret, OPERATOR_PASSWORD_KEY),
                read(&secret, CONSUMER_PASSWORD_KEY),
            ) {
                (Some(a), Some(c)) => Ok((a, c)),
                _ => Err(format!(
                    "Secret {}/{} lacks {OPERATOR_PASSWORD_KEY} or {CONSUMER_PASSWORD_KEY}",
                    b.namespace, b.auth_secret
                )
                .into()),
            }
        }
        Err(e) => Err(e.into()),
    }
}

/// 256 random bits, hex.
fn new_password() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex::encode(bytes))
}
