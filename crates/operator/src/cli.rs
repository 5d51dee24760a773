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

use crate::certs;
use crate::error::Error;

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
        Ok(errors.into_result()?)
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
