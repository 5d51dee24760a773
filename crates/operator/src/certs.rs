//! The webhook's serving certificate. Either the operator manages it (a CA and a server
//! certificate made with rcgen, kept in a Secret so that every replica serves the same one,
//! the CA patched into the MutatingWebhookConfiguration's caBundle, both replaced before
//! they expire), or cert-manager does and the operator reads the mounted files.
//!
//! A rotation makes a new CA and certificate, publishes a caBundle with the new and the
//! previous CA, and only then serves the new certificate: the API server trusts the webhook
//! through every step.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

const KEY_CA: &str = "ca.crt";
const KEY_BUNDLE: &str = "ca-bundle.crt";
const KEY_CERT: &str = "tls.crt";
const KEY_KEY: &str = "tls.key";
const ANNOTATION_NOT_AFTER: &str = "virusscan.aether-platform.io/not-after";

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate files: {0}")]
    Files(String),
    #[error("TLS key: {0}")]
    Tls(#[from] rustls::Error),
}

/// The certificate the TLS listener presents; swapped in place on rotation.
#[derive(Debug, Default)]
pub struct CertResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl CertResolver {
    pub fn is_loaded(&self) -> bool {
        self.current.read().is_ok_and(|c| c.is_some())
    }

    fn load(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), CertError> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| CertError::Files(format!("certificate PEM: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| CertError::Files(format!("key PEM: {e}")))?;
        let provider = rustls::crypto::ring::default_provider();
        let certified = CertifiedKey::from_der(chain, key, &provider)?;
        if let Ok(mut current) = self.current.write() {
            *current = Some(Arc::new(certified));
        }
        Ok(())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().and_then(|c| c.clone())
    }
}

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    /// Made and rotated by the operator.
    Managed(ManagedCert),
    /// `tls.crt` and `tls.key` in a directory (a cert-manager Secret mounted), re-read on
    /// every check.
    Files(PathBuf),
}

#[derive(Debug, Clone)]
pub struct ManagedCert {
    pub namespace: String,
    pub secret_name: String,
    pub webhook_config_name: String,
    /// Subject alternative names: the Service's DNS names (and IPs for out-of-cluster use).
    pub names: Vec<String>,
    pub validity: Duration,
    pub renew_before: Duration,
}

/// Keeps the resolver loaded, forever: checks every `interval`, and at once whenever the
/// webhook configuration changes (a `helm upgrade` that re-applies it without a caBundle
/// is repaired in a moment, not after a whole interval).
pub async fn maintain(
    client: Client,
    source: CertSource,
    resolver: Arc<CertResolver>,
    interval: Duration,
) {
    let changed = Arc::new(tokio::sync::Notify::new());
    if let CertSource::Managed(m) = &source {
        let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        let config = kube::runtime::watcher::Config::default()
            .fields(&format!("metadata.name={}", m.webhook_config_name));
        let changed = changed.clone();
        tokio::spawn(async move {
            use futures_util::StreamExt;
            use kube::runtime::WatchStreamExt;
            let mut events = kube::runtime::watcher(api, config)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(event) = events.next().await {
                if event.is_ok() {
                    changed.notify_one();
                }
            }
        });
    }
    loop {
        let result = match &source {
            CertSource::Managed(m) => ensure_managed(&client, m, &resolver).await,
            CertSource::Files(dir) => load_files(dir, &resolver),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "webhook certificate check failed");
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = changed.notified() => {}
        }
    }
}

fn load_files(dir: &std::path::Path, resolver: &CertResolver) -> Result<(), CertError> {
    let read = |name: &str| {
        std::fs::read(dir.join(name))
            .map_err(|e| CertError::Files(format!("{}: {e}", dir.join(name).display())))
    };
    resolver.load(&read(KEY_CERT)?, &read(KEY_KEY)?)
}

/// One check: make or rotate the Secret when needed, publish the caBundle, serve the
/// Secret's certificate.
pub async fn ensure_managed(
    client: &Client,
    m: &ManagedCert,
    resolver: &CertResolver,
) -> Result<(), CertError> {
    let secret = ensure_secret(client, m).await?;
    let bundle = field(&secret, KEY_BUNDLE)
        .or_else(|| field(&secret, KEY_CA))
        .ok_or_else(|| CertError::Files(format!("Secret {} has no {KEY_CA}", m.secret_name)))?;
    patch_ca_bundle(client, &m.webhook_config_name, bundle).await?;
    let cert = field(&secret, KEY_CERT)
        .ok_or_else(|| CertError::Files(format!("Secret {} has no {KEY_CERT}", m.secret_name)))?;
    let key = field(&secret, KEY_KEY)
        .ok_or_else(|| CertError::Files(format!("Secret {} has no {KEY_KEY}", m.secret_name)))?;
    resolver.load(cert, key)
}

/// The Secret with a CA (`ca.crt`, and `ca-bundle.crt` with the previous CA while it is
/// trusted) and a server certificate (`tls.crt`, `tls.key`) for `m.names`: made, or renewed
/// when close to its end.
pub async fn ensure_secret(client: &Client, m: &ManagedCert) -> Result<Secret, CertError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &m.namespace);
    let mut secret = secrets.get_opt(&m.secret_name).await?;
    if secret
        .as_ref()
        .is_none_or(|s| needs_renewal(s, m.renew_before))
    {
        let previous_ca = secret.as_ref().and_then(|s| field(s, KEY_CA)).cloned();
        let fresh = issue(m, previous_ca.as_deref())?;
        let written = match &secret {
            None => secrets.create(&PostParams::default(), &fresh).await,
            Some(old) => {
                let mut next = fresh.clone();
                next.metadata.resource_version = old.metadata.resource_version.clone();
                secrets
                    .replace(&m.secret_name, &PostParams::default(), &next)
                    .await
            }
        };
        secret = match written {
            Ok(s) => {
                tracing::info!(secret = m.secret_name, "issued a new certificate");
                Some(s)
            }
            // Another replica rotated first: use what it wrote.
            Err(kube::Error::Api(s)) if s.code == 409 => secrets.get_opt(&m.secret_name).await?,
            Err(e) => return Err(e.into()),
        };
    }
    secret.ok_or_else(|| CertError::Files("the certificate Secret vanished".into()))
}

fn field<'a>(secret: &'a Secret, key: &str) -> Option<&'a Vec<u8>> {
    secret.data.as_ref()?.get(key).map(|b| &b.0)
}

fn needs_renewal(secret: &Secret, renew_before: Duration) -> bool {
    let not_after = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_NOT_AFTER))
        .and_then(|t| t.parse::<Timestamp>().ok());
    let complete = [KEY_CA, KEY_CERT, KEY_KEY]
        .iter()
        .all(|k| field(secret, k).is_some());
    let renew_at = not_after
        .map(|t| t - SignedDuration::try_from(renew_before).unwrap_or(SignedDuration::ZERO));
    !complete || renew_at.is_none_or(|at| Timestamp::now() >= at)
}

/// A new CA and a server certificate it signs, as the Secret to store.
fn issue(m: &ManagedCert, previous_ca: Option<&[u8]>) -> Result<Secret, CertError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let now = time::OffsetDateTime::now_utc();
    let validity = time::Duration::try_from(m.validity).unwrap_or(time::Duration::DAY);
    // A little slack for clocks that are behind ours.
    let not_before = now - time::Duration::minutes(5);
    let not_after = now + validity;

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.distinguished_name
        .push(DnType::CommonName, "virus-scan-operator webhook CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = not_before;
    // The CA outlives the certificates it signs by one validity period, so that the
    // previous CA is still valid while it sits in the bundle.
    ca.not_after = not_after + validity;
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate()?;
    let mut server = CertificateParams::new(m.names.clone())?;
    server.distinguished_name.push(
        DnType::CommonName,
        m.names.first().cloned().unwrap_or_default(),
    );
    server.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server.not_before = not_before;
    server.not_after = not_after;
    let cert = server.signed_by(&key, &issuer)?;

    let ca_pem = ca_cert.pem();
    let mut bundle = ca_pem.clone().into_bytes();
    if let Some(previous) = previous_ca {
        bundle.extend_from_slice(previous);
    }
    let not_after_ts = Timestamp::from_second(not_after.unix_timestamp())
        .map_err(|e| CertError::Files(format!("expiry out of range: {e}")))?;
    let data = BTreeMap::from([
        (KEY_CA.to_owned(), ByteString(ca_pem.into_bytes())),
        (KEY_BUNDLE.to_owned(), ByteString(bundle)),
        (KEY_CERT.to_owned(), ByteString(cert.pem().into_bytes())),
        (
            KEY_KEY.to_owned(),
            ByteString(key.serialize_pem().into_bytes()),
        ),
    ]);
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(m.secret_name.clone()),
            namespace: Some(m.namespace.clone()),
            labels: Some(BTreeMap::from([(
                crate::controller::MANAGED_BY.0.to_owned(),
                crate::controller::MANAGED_BY.1.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(
                ANNOTATION_NOT_AFTER.to_owned(),
                not_after_ts.to_string(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Secret::default()
    })
}

/// Sets every webhook's caBundle in the configuration, when it differs.
async fn patch_ca_bundle(client: &Client, name: &str, bundle: &[u8]) -> Result<(), CertError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut config) = api.get_opt(name).await? else {
        tracing::warn!(
            configuration = name,
            "MutatingWebhookConfiguration not found; the API server cannot call the webhook yet"
        );
        return Ok(());
    };
    let mut changed = false;
    for hook in config.webhooks.iter_mut().flatten() {
        if hook
            .client_config
            .ca_bundle
            .as_ref()
            .map(|b| b.0.as_slice())
            != Some(bundle)
        {
            hook.client_config.ca_bundle = Some(ByteString(bundle.to_vec()));
            changed = true;
        }
    }
    if changed {
        api.replace(name, &PostParams::default(), &config).await?;
        tracing::info!(configuration = name, "patched the webhook caBundle");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn managed() -> ManagedCert {
        ManagedCert {
            namespace: "ns".into(),
            secret_name: "s".into(),
            webhook_config_name: "w".into(),
            names: vec!["svc.ns.svc".into(), "127.0.0.1".into()],
            validity: Duration::from_secs(3600),
            renew_before: Duration::from_secs(600),
        }
    }

    #[test]
    fn issued_secret_loads_and_is_not_due_for_renewal() {
        let secret = issue(&managed(), None).expect("issue");
        assert!(!needs_renewal(&secret, Duration::from_secs(600)));
        assert!(needs_renewal(&secret, Duration::from_secs(3700)));
        let resolver = CertResolver::default();
        resolver
            .load(
                field(&secret, KEY_CERT).expect("cert"),
                field(&secret, KEY_KEY).expect("key"),
            )
            .expect("load");
        assert!(resolver.is_loaded());
    }

    #[test]
    fn bundle_keeps_the_previous_ca() {
        let first = issue(&managed(), None).expect("issue");
        let second = issue(&managed(), field(&first, KEY_CA).map(Vec::as_slice)).expect("issue");
        let bundle =
            String::from_utf8(field(&second, KEY_BUNDLE).expect("bundle").clone()).expect("utf8");
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
        let first_ca = String::from_utf8(field(&first, KEY_CA).expect("ca").clone()).expect("u");
        assert!(bundle.contains(&first_ca));
    }

    #[test]
    fn incomplete_or_unannotated_secret_is_renewed() {
        assert!(needs_renewal(&Secret::default(), Duration::ZERO));
    }
}
