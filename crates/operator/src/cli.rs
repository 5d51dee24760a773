//! The command line of `virus-scan-operator` and the settings of `run`. Every setting has a
//! flag and an environment variable, read from an [`Env`] (the process environment in
//! `main`, a map in tests): a flag wins over the variable, the variable over the default.
//! Values that do not parse are all named in one error; so are the settings that parse but
//! are out of range.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use virus_scanner_runtime::LogFormat;
use virus_scanner_runtime::env::{ConfigErrors, Env};

use virus_scanner_queue::{QueueConfig, RedisConfig};

use crate::certs;
use crate::crd::{RedisSettings, SecretKeyRef};
use crate::error::Error;
use crate::tenants::{self, TenantUsers};

#[derive(Debug, Parser)]
#[command(name = "virus-scan-operator", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (the default).
    Run,
    /// Print the VirusScanPolicy CustomResourceDefinition.
    Crd,
    /// Render the Envoy configuration of a policy file, without a cluster.
    EnvoyConfig(EnvoyConfigArgs),
    /// Explain why a pod (or `deploy/NAME`) is or is not protected.
    Check(crate::check::CheckArgs),
    /// Print the `ACL SETUSER` lines of the consumers' user and of each tenant's, to apply to
    /// an external Redis by hand (passwords as placeholders).
    RedisAcl(RedisAclArgs),
}

#[derive(Debug, clap::Args)]
pub struct RedisAclArgs {
    /// Tenant namespaces.
    #[arg(long = "tenant")]
    pub tenants: Vec<String>,
    #[arg(long, default_value = "virus-scanner")]
    pub queue_prefix: String,
    #[arg(long, default_value = "vs-consumer")]
    pub consumer_user: String,
}

impl RedisAclArgs {
    /// One line per user.
    pub fn lines(&self) -> Result<String, Error> {
        let defaults = QueueConfig::new(RedisConfig::from_host_port("localhost", 6379, false));
        let mut out = String::new();
        let consumer = virus_scanner_queue::acl::consumer_rules(
            &self.queue_prefix,
            &defaults.legacy_queue,
            &defaults.legacy_result_prefix,
        );
        out += &virus_scanner_queue::acl::setuser_line(
            &self.consumer_user,
            ">CONSUMER_PASSWORD",
            &consumer,
        );
        out.push('\n');
        for tenant in &self.tenants {
            if tenant.is_empty()
                || tenant.len() > 63
                || !tenant
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                let mut errors = ConfigErrors::new();
                errors.push(format!("{tenant:?} is not a namespace name"));
                return Err(Error::Config(errors));
            }
            out += &virus_scanner_queue::acl::setuser_line(
                &virus_scanner_queue::acl::tenant_user(tenant),
                &format!(
                    ">{}_PASSWORD",
                    tenant.to_ascii_uppercase().replace(['-', '.'], "_")
                ),
                &virus_scanner_queue::acl::tenant_rules(&self.queue_prefix, tenant),
            );
            out.push('\n');
            out += &format!("SADD {{{}}}:tenants {tenant}\n", self.queue_prefix);
        }
        Ok(out)
    }
}

#[derive(Debug, clap::Args)]
pub struct EnvoyConfigArgs {
    /// A VirusScanPolicy (YAML or JSON); `-` reads standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: PathBuf,
    /// Merge into this Envoy bootstrap and print the derived bootstrap.
    #[arg(long)]
    pub bootstrap: Option<PathBuf>,
    /// Print one piece only: filter, cluster, connection-manager, routes or bootstrap (the
    /// example).
    #[arg(long)]
    pub piece: Option<String>,
    /// The gateway to render for: plain Envoy (the pieces), Envoy Gateway (its
    /// EnvoyExtensionPolicy, Backend and ClientTrafficPolicy objects) or Istio (an
    /// EnvoyFilter). Without it, the policy's `spec.gateway`, else what its selector's
    /// labels name, else envoy.
    #[arg(long, value_enum)]
    pub target: Option<Target>,
}

/// `envoy-config --target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    Envoy,
    EnvoyGateway,
    Istio,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Address of /health, /ready and /metrics.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Namespace of the leader lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "virus-scanner")]
    pub namespace: String,
    /// This replica's name in the lease; defaults to the host name and process id.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    #[arg(long, env = "LEASE_NAME", default_value = "virus-scan-operator")]
    pub lease_name: String,
    /// How long a leader's lease lasts without renewal; it renews every third of it.
    #[arg(long, env = "LEASE_DURATION_SECONDS", default_value_t = 15)]
    pub lease_duration_seconds: u64,
    /// json or text.
    #[arg(long, env = "LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,

    /// HTTPS address of the sidecar injector (`/mutate`).
    #[arg(long, env = "WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,
    /// The Service in front of the webhook; its DNS names go into the certificate.
    #[arg(
        long,
        env = "WEBHOOK_SERVICE",
        default_value = "virus-scan-operator-webhook"
    )]
    pub webhook_service: String,
    /// More subject alternative names (comma-separated DNS names or IPs).
    #[arg(long, env = "WEBHOOK_EXTRA_SANS", value_delimiter = ',')]
    pub webhook_extra_sans: Vec<String>,
    /// The namespace where Envoy Gateway runs the proxies of Gateways in other namespaces
    /// (its default deploy mode): a pod there labelled with its Gateway's namespace is
    /// injected by that namespace's Envoy Gateway policy. Empty turns this off.
    #[arg(
        long,
        env = "ENVOY_GATEWAY_NAMESPACE",
        default_value = "envoy-gateway-system"
    )]
    pub envoy_gateway_namespace: String,
    /// Istio's root namespace (its `meshConfig.rootNamespace`): EnvoyFilters there apply to
    /// gateways of every namespace, so they are read for a policy's status too. Empty turns
    /// this off.
    #[arg(long, env = "ISTIO_ROOT_NAMESPACE", default_value = "istio-system")]
    pub istio_root_namespace: String,
    /// The MutatingWebhookConfiguration whose caBundle the operator keeps current.
    #[arg(
        long,
        env = "WEBHOOK_CONFIG_NAME",
        default_value = "virus-scan-operator"
    )]
    pub webhook_config_name: String,
    /// The Secret (in the operator's namespace) that holds the CA and serving certificate.
    #[arg(
        long,
        env = "WEBHOOK_SECRET_NAME",
        default_value = "virus-scan-operator-webhook-tls"
    )]
    pub webhook_secret_name: String,
    /// Read tls.crt and tls.key from this directory (cert-manager) instead of managing them.
    #[arg(long, env = "WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<PathBuf>,
    #[arg(long, env = "WEBHOOK_CERT_VALIDITY_SECONDS", default_value_t = 365 * 24 * 3600)]
    pub webhook_cert_validity_seconds: u64,
    /// Rotate when the certificate has less than this left.
    #[arg(long, env = "WEBHOOK_CERT_RENEW_BEFORE_SECONDS", default_value_t = 30 * 24 * 3600)]
    pub webhook_cert_renew_before_seconds: u64,
    /// How often the certificate is checked (and re-read in cert-manager mode).
    #[arg(long, env = "WEBHOOK_CERT_CHECK_SECONDS", default_value_t = 60)]
    pub webhook_cert_check_seconds: u64,

    /// The producer image injected when a policy names none.
    #[arg(long, env = "PRODUCER_IMAGE", default_value = concat!("ghcr.io/aether-platform/virus-scanner:", env!("CARGO_PKG_VERSION")))]
    pub producer_image: String,
    /// Redis for policies that name none (the chart's).
    #[arg(
        long,
        env = "DEFAULT_REDIS_HOST",
        default_value = "virus-scanner-redis.virus-scanner.svc"
    )]
    pub default_redis_host: String,
    #[arg(long, env = "DEFAULT_REDIS_PORT", default_value_t = 6379)]
    pub default_redis_port: u16,
    #[arg(long, env = "DEFAULT_REDIS_TLS", default_value_t = false)]
    pub default_redis_tls: bool,
    /// The CA of the default Redis's TLS certificate (PEM); tenants get a copy in their
    /// Secret.
    #[arg(long, env = "DEFAULT_REDIS_CA_FILE")]
    pub default_redis_ca_file: Option<PathBuf>,
    /// Keep a Redis ACL user per namespace with policies on the default Redis, with its
    /// credentials in the Secret `virus-scanner-redis-<namespace>` there, which the sidecar is
    /// given.
    #[arg(long, env = "TENANT_REDIS_USERS", default_value_t = false)]
    pub tenant_redis_users: bool,
    /// The operator's Redis user, which may administer ACL users.
    #[arg(long, env = "REDIS_ADMIN_USERNAME")]
    pub redis_admin_username: Option<String>,
    #[arg(long, env = "REDIS_ADMIN_PASSWORD", hide_env_values = true)]
    pub redis_admin_password: Option<String>,
    /// The consumers' Redis user, kept with the consumers' rules when its password is set.
    #[arg(long, env = "REDIS_CONSUMER_USERNAME", default_value = "vs-consumer")]
    pub redis_consumer_username: String,
    #[arg(long, env = "REDIS_CONSUMER_PASSWORD", hide_env_values = true)]
    pub redis_consumer_password: Option<String>,
    /// Prefix of the queue's keys (the consumers' `QUEUE_PREFIX`).
    #[arg(long, env = "QUEUE_PREFIX", default_value = "virus-scanner")]
    pub queue_prefix: String,
    /// The bundled Redis: the operator keeps its passwords and ACL file in this Secret (in its
    /// own namespace) and reads them from there instead of REDIS_ADMIN_PASSWORD.
    #[arg(long, env = "REDIS_AUTH_SECRET")]
    pub redis_auth_secret: Option<String>,
    /// The bundled Redis: the operator keeps its TLS certificate (from a CA of its own) in
    /// this Secret, for the names of DEFAULT_REDIS_HOST.
    #[arg(long, env = "REDIS_TLS_SECRET")]
    pub redis_tls_secret: Option<String>,
    /// How often the tenants' Redis users are checked and re-applied.
    #[arg(long, env = "TENANT_REDIS_USERS_PERIOD_SECONDS", default_value_t = 10)]
    pub tenant_redis_users_period_seconds: u64,
}

impl Cli {
    /// Parses `argv` (program name first) with the settings in `env`.
    pub fn parse_from<I, T>(argv: I, env: &(impl Env + ?Sized)) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        virus_scanner_runtime::env::parse_from(argv, env)
    }
}

impl RunArgs {
    /// Checks the settings that parsed; the error names every one out of range.
    pub fn validate(&self) -> Result<(), Error> {
        let mut errors = ConfigErrors::new();
        if !(3..=3600).contains(&self.lease_duration_seconds) {
            errors.push(format!(
                "LEASE_DURATION_SECONDS must be between 3 and 3600, got {}",
                self.lease_duration_seconds
            ));
        }
        if self.webhook_cert_renew_before_seconds >= self.webhook_cert_validity_seconds {
            errors.push(format!(
                "WEBHOOK_CERT_RENEW_BEFORE_SECONDS ({}) must be less than WEBHOOK_CERT_VALIDITY_SECONDS ({})",
                self.webhook_cert_renew_before_seconds, self.webhook_cert_validity_seconds
            ));
        }
        if self.webhook_cert_check_seconds < 1 {
            errors.push("WEBHOOK_CERT_CHECK_SECONDS must be at least 1");
        }
        if self.producer_image.is_empty() {
            errors.push("PRODUCER_IMAGE must not be empty");
        }
        if self.tenant_redis_users {
            if self
                .redis_admin_password
                .as_deref()
                .unwrap_or("")
                .is_empty()
                && self.redis_auth_secret.is_none()
            {
                errors.push("TENANT_REDIS_USERS needs REDIS_ADMIN_PASSWORD or REDIS_AUTH_SECRET");
            }
            if self.redis_auth_secret.is_some() != self.redis_tls_secret.is_some() {
                errors.push("REDIS_AUTH_SECRET and REDIS_TLS_SECRET go together");
            }
            if self.tenant_redis_users_period_seconds == 0 {
                errors.push("TENANT_REDIS_USERS_PERIOD_SECONDS must be positive");
            }
        }
        Ok(errors.into_result()?)
    }

    /// The Redis a policy without `spec.redis` is given: the chart's, with the tenant's own
    /// credentials from its Secret when the operator keeps them.
    pub fn default_redis(&self) -> RedisSettings {
        let tenant_secret = |key: &str| {
            Some(SecretKeyRef {
                name: tenants::SECRET_NAME.to_owned(),
                key: key.to_owned(),
            })
        };
        let managed = self.tenant_redis_users;
        RedisSettings {
            host: self.default_redis_host.clone(),
            port: self.default_redis_port,
            tls: self.default_redis_tls,
            username_secret_ref: managed
                .then(|| tenant_secret(tenants::USERNAME_KEY))
                .flatten(),
            password_secret_ref: managed
                .then(|| tenant_secret(tenants::PASSWORD_KEY))
                .flatten(),
            ca_secret_ref: (managed && self.default_redis_ca_file.is_some())
                .then(|| tenant_secret(tenants::CA_KEY))
                .flatten(),
        }
    }

    /// What the tenants' Redis users are kept with, when the operator keeps them.
    pub fn tenant_users(&self) -> Result<Option<TenantUsers>, Error> {
        if !self.tenant_redis_users {
            return Ok(None);
        }
        let mut redis = RedisConfig::from_host_port(
            &self.default_redis_host,
            self.default_redis_port,
            self.default_redis_tls,
        );
        redis.username = self.redis_admin_username.clone();
        redis.password = self.redis_admin_password.clone();
        redis.ca_file = self.default_redis_ca_file.clone();
        let defaults = QueueConfig::new(redis.clone());
        Ok(Some(TenantUsers {
            redis,
            prefix: self.queue_prefix.clone(),
            ca_file: self.default_redis_ca_file.clone(),
            consumer: self
                .redis_consumer_password
                .clone()
                .filter(|p| !p.is_empty())
                .map(|p| (self.redis_consumer_username.clone(), p)),
            legacy_queue: defaults.legacy_queue,
            legacy_result_prefix: defaults.legacy_result_prefix,
            period: Duration::from_secs(self.tenant_redis_users_period_seconds),
            backbone: self.backbone(),
            envoy_gateway_namespace: Some(self.envoy_gateway_namespace.clone()),
        }))
    }

    /// The bundled Redis's secrets, when the operator keeps them.
    fn backbone(&self) -> Option<tenants::Backbone> {
        let (auth, tls) = (
            self.redis_auth_secret.clone()?,
            self.redis_tls_secret.clone()?,
        );
        let host = self.default_redis_host.clone();
        let mut names = vec![host.clone()];
        // `name.namespace.svc` also answers as `name.namespace` and `name`.
        if let Some(short) = host.strip_suffix(".svc") {
            names.push(short.to_owned());
            names.push(format!("{host}.cluster.local"));
            if let Some((service, _)) = short.split_once('.') {
                names.push(service.to_owned());
            }
        }
        Some(tenants::Backbone {
            namespace: self.namespace.clone(),
            auth_secret: auth,
            admin_user: self
                .redis_admin_username
                .clone()
                .unwrap_or_else(|| "vs-operator".to_owned()),
            consumer_user: self.redis_consumer_username.clone(),
            tls: certs::ManagedCert {
                namespace: self.namespace.clone(),
                secret_name: tls,
                webhook_config_name: String::new(),
                names,
                validity: Duration::from_secs(self.webhook_cert_validity_seconds),
                renew_before: Duration::from_secs(self.webhook_cert_renew_before_seconds),
            },
        })
    }

    pub(crate) fn cert_source(&self) -> certs::CertSource {
        if let Some(dir) = &self.webhook_cert_dir {
            return certs::CertSource::Files(dir.clone());
        }
        let (svc, ns) = (&self.webhook_service, &self.namespace);
        let mut names = vec![
            format!("{svc}.{ns}.svc"),
            format!("{svc}.{ns}.svc.cluster.local"),
            format!("{svc}.{ns}"),
            svc.clone(),
        ];
        names.extend(self.webhook_extra_sans.iter().cloned());
        certs::CertSource::Managed(certs::ManagedCert {
            namespace: ns.clone(),
            secret_name: self.webhook_secret_name.clone(),
            webhook_config_name: self.webhook_config_name.clone(),
            names,
            validity: Duration::from_secs(self.webhook_cert_validity_seconds),
            renew_before: Duration::from_secs(self.webhook_cert_renew_before_seconds),
        })
    }

    pub(crate) fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "operator".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(argv: &[&str], env: &[(&str, &str)]) -> Result<RunArgs, clap::Error> {
        let argv = std::iter::once("virus-scan-operator").chain(argv.iter().copied());
        Cli::parse_from(argv, env).map(|cli| cli.run)
    }

    fn invalid(args: &RunArgs) -> Vec<String> {
        match args.validate() {
            Err(Error::Config(errors)) => errors.messages().to_vec(),
            other => panic!("expected invalid settings, got {other:?}"),
        }
    }

    #[test]
    fn defaults_need_no_environment() {
        let args = run_args(&[], &[]).expect("defaults");
        args.validate().expect("valid");
        assert_eq!(args.metrics_addr, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(args.namespace, "virus-scanner");
        assert_eq!(args.identity, None);
        assert_eq!(args.lease_duration_seconds, 15);
        assert!(args.producer_image.ends_with(env!("CARGO_PKG_VERSION")));
        assert!(!args.default_redis_tls);
        assert!(args.webhook_extra_sans.is_empty());
    }

    #[test]
    fn environment_values_are_typed_and_flags_win() {
        let args = run_args(
            &["--lease-duration-seconds", "30"],
            &[
                ("POD_NAME", "op-0"),
                ("LEASE_DURATION_SECONDS", "4"),
                ("LOG_FORMAT", "text"),
                ("WEBHOOK_EXTRA_SANS", "127.0.0.1,gw.example"),
                ("WEBHOOK_CERT_DIR", "/etc/tls"),
                ("DEFAULT_REDIS_TLS", "true"),
            ],
        )
        .expect("valid");
        assert_eq!(args.identity(), "op-0");
        assert_eq!(args.lease_duration_seconds, 30);
        assert_eq!(args.log_format, LogFormat::Text);
        assert_eq!(args.webhook_extra_sans, ["127.0.0.1", "gw.example"]);
        assert!(
            matches!(args.cert_source(), certs::CertSource::Files(d) if d == std::path::Path::new("/etc/tls"))
        );
        assert!(args.default_redis_tls);
    }

    #[test]
    fn every_value_that_does_not_parse_is_named_at_once() {
        let e = run_args(
            &[],
            &[
                ("METRICS_ADDR", "not-an-address"),
                ("LOG_FORMAT", "xml"),
                ("DEFAULT_REDIS_PORT", "70000"),
            ],
        )
        .expect_err("invalid");
        let message = e.to_string();
        for name in ["METRICS_ADDR", "LOG_FORMAT", "DEFAULT_REDIS_PORT"] {
            assert!(message.contains(name), "{name} not in {message}");
        }
    }

    #[test]
    fn every_setting_out_of_range_is_named_at_once() {
        let args = run_args(
            &[],
            &[
                ("LEASE_DURATION_SECONDS", "2"),
                ("WEBHOOK_CERT_VALIDITY_SECONDS", "100"),
                ("WEBHOOK_CERT_RENEW_BEFORE_SECONDS", "200"),
                ("WEBHOOK_CERT_CHECK_SECONDS", "0"),
                ("PRODUCER_IMAGE", ""),
            ],
        )
        .expect("parses");
        let errors = invalid(&args);
        for name in [
            "LEASE_DURATION_SECONDS",
            "WEBHOOK_CERT_RENEW_BEFORE_SECONDS (200)",
            "WEBHOOK_CERT_CHECK_SECONDS",
            "PRODUCER_IMAGE",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(name)),
                "{name} not in {errors:?}"
            );
        }
        assert_eq!(errors.len(), 4, "{errors:?}");
    }

    #[test]
    fn managed_certificate_names_the_service_in_every_form() {
        let args = run_args(
            &[],
            &[
                ("POD_NAMESPACE", "ops"),
                ("WEBHOOK_SERVICE", "hook"),
                ("WEBHOOK_EXTRA_SANS", "127.0.0.1"),
            ],
        )
        .expect("valid");
        let certs::CertSource::Managed(m) = args.cert_source() else {
            panic!("managed");
        };
        assert_eq!(
            m.names,
            [
                "hook.ops.svc",
                "hook.ops.svc.cluster.local",
                "hook.ops",
                "hook",
                "127.0.0.1"
            ]
        );
    }
}
