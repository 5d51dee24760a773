//! `virus-scan-operator`: the VirusScanPolicy CRD, the controller that turns policies into
//! Envoy configuration, and the tools to render both offline.
#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod certs;
pub mod controller;
pub mod crd;
pub mod envoy;
pub mod error;
pub mod inject;
pub mod lease;
pub mod metrics;
pub mod selector;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use virus_scanner_runtime::LogFormat;

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

#[derive(Debug, Args)]
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

#[derive(Debug, Clone, Args)]
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

impl RunArgs {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (3..=3600).contains(&self.lease_duration_seconds),
            "LEASE_DURATION_SECONDS must be between 3 and 3600, got {}",
            self.lease_duration_seconds
        );
        anyhow::ensure!(
            self.webhook_cert_renew_before_seconds < self.webhook_cert_validity_seconds,
            "WEBHOOK_CERT_RENEW_BEFORE_SECONDS ({}) must be less than WEBHOOK_CERT_VALIDITY_SECONDS ({})",
            self.webhook_cert_renew_before_seconds,
            self.webhook_cert_validity_seconds
        );
        anyhow::ensure!(
            self.webhook_cert_check_seconds >= 1,
            "WEBHOOK_CERT_CHECK_SECONDS must be at least 1"
        );
        anyhow::ensure!(
            !self.producer_image.is_empty(),
            "PRODUCER_IMAGE must not be empty"
        );
        Ok(())
    }

    fn cert_source(&self) -> certs::CertSource {
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

    fn identity(&self) -> String {
        self.identity.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "operator".to_owned());
            format!("{host}-{}", std::process::id())
        })
    }
}

/// Runs the operator until SIGTERM: the ops endpoint on every replica, the controller only
/// on the leader. Losing the lease ends the process (the kubelet restarts it as a
/// candidate), which is the one way to be sure no write of the old term is in flight.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    args.validate()?;
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration (in-cluster or KUBECONFIG)")?;
    let identity = args.identity();
    let mut registry = Registry::with_prefix("virus_scan_operator");
    let metrics = metrics::Metrics::register(&mut registry);

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = {
        let rx = stop_rx.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };
    tokio::spawn(async move {
        virus_scanner_runtime::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });

    let webhook_metrics = webhook::WebhookMetrics::register(&mut registry);

    // The injector runs on every replica.
    let resolver = Arc::new(certs::CertResolver::default());
    tokio::spawn(certs::maintain(
        client.clone(),
        args.cert_source(),
        resolver.clone(),
        Duration::from_secs(args.webhook_cert_check_seconds),
    ));
    let (policies, cache) = webhook::policy_cache(client.clone());
    tokio::spawn(cache);
    let injector = webhook::Injector {
        policies,
        defaults: Arc::new(inject::InjectDefaults {
            image: args.producer_image.clone(),
            redis: crd::RedisSettings {
                host: args.default_redis_host.clone(),
                port: args.default_redis_port,
                tls: args.default_redis_tls,
                password_secret_ref: None,
                ca_secret_ref: None,
            },
        }),
        metrics: webhook_metrics,
    };
    let webhook_listener = tokio::net::TcpListener::bind(args.webhook_addr)
        .await
        .with_context(|| format!("cannot bind WEBHOOK_ADDR {}", args.webhook_addr))?;
    tracing::info!(addr = %webhook_listener.local_addr()?, "webhook listening");
    tokio::spawn({
        let resolver = resolver.clone();
        let app = webhook::router(injector);
        let stop = stopped();
        async move {
            if let Err(e) = webhook::serve_tls(webhook_listener, resolver, app, stop).await {
                tracing::error!(error = %e, "webhook TLS configuration failed");
            }
        }
    });

    // Ready once the webhook has a certificate to present.
    let ready: virus_scanner_runtime::ReadinessCheck = Arc::new(move || {
        let loaded = resolver.is_loaded();
        Box::pin(async move {
            if loaded {
                Ok(())
            } else {
                Err("no webhook certificate yet".to_owned())
            }
        })
    });
    let router = virus_scanner_runtime::ops_router(Arc::new(registry), ready);
    let (addr, serve) = virus_scanner_runtime::bind_ops(args.metrics_addr, router, stopped())
        .await
        .with_context(|| format!("cannot bind METRICS_ADDR {}", args.metrics_addr))?;
    tracing::info!(%addr, identity, "operator started");
    let ops = tokio::spawn(serve);

    let elector = lease::LeaderElector::new(
        client.clone(),
        &args.namespace,
        &args.lease_name,
        &identity,
        Duration::from_secs(args.lease_duration_seconds),
    );
    let outcome = lead(&elector, client, metrics.clone(), &identity, stopped).await;
    metrics.leader.set(0);
    elector.release().await;
    ops.abort();
    outcome
}

async fn lead<F, Fut>(
    elector: &lease::LeaderElector,
    client: kube::Client,
    metrics: metrics::Metrics,
    identity: &str,
    stopped: F,
) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + Sync + 'static,
{
    let shutdown = stopped();
    tokio::pin!(shutdown);
    loop {
        match elector.try_acquire_or_renew().await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the leader lease"),
        }
        tokio::select! {
            () = &mut shutdown => return Ok(()),
            () = tokio::time::sleep(elector.retry_period()) => {}
        }
    }
    tracing::info!(identity = elector.identity(), "leading");
    metrics.leader.set(1);

    let ctx = Arc::new(controller::Context::new(client, identity, metrics));
    let (lost_tx, lost_rx) = watch::channel(false);
    let controller_stop = {
        let mut lost = lost_rx;
        let stop = stopped();
        async move {
            tokio::select! {
                () = stop => {}
                _ = lost.wait_for(|l| *l) => {}
            }
        }
    };
    let controller = tokio::spawn(controller::run(ctx, controller_stop));
    let mut last_renewal = tokio::time::Instant::now();
    let deadline = elector.retry_period() * 3;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = tokio::time::sleep(elector.retry_period()) => {}
        }
        match elector.try_acquire_or_renew().await {
            Ok(true) => last_renewal = tokio::time::Instant::now(),
            Ok(false) => {
                let _ = lost_tx.send(true);
                let _ = controller.await;
                anyhow::bail!("lost the leader lease to another replica");
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the leader lease");
                if last_renewal.elapsed() >= deadline {
                    let _ = lost_tx.send(true);
                    let _ = controller.await;
                    anyhow::bail!("could not renew the leader lease for {deadline:?}");
                }
            }
        }
    }
    let _ = controller.await;
    Ok(())
}

/// `virus-scan-operator envoy-config`: what the controller would write, on standard output.
pub fn envoy_config(args: &EnvoyConfigArgs) -> anyhow::Result<String> {
    let text = if args.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("reading the policy from stdin")?
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let policy: crd::VirusScanPolicy = serde_saphyr::from_str(&text)
        .with_context(|| format!("{} is not a VirusScanPolicy", args.file.display()))?;
    let spec = &policy.spec;
    if let Some(path) = &args.bootstrap {
        let tenant =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let (merged, report) = bootstrap::merge(&tenant, spec)
            .with_context(|| format!("merging into {}", path.display()))?;
        for route in &report.unmatched_opt_outs {
            eprintln!("warning: opted-out route {route:?} matches no route of the bootstrap");
        }
        return Ok(envoy::to_yaml(&merged));
    }
    let piece = |name: &str| match name {
        "filter" => Ok(envoy::to_yaml(&envoy::ext_proc_filter(spec))),
        "cluster" => Ok(envoy::to_yaml(&envoy::producer_cluster(spec))),
        "connection-manager" => Ok(envoy::to_yaml(&serde_json::Value::Object(
            envoy::connection_manager_settings(),
        ))),
        "routes" => Ok(envoy::to_yaml(&serde_json::json!(envoy::route_overrides(
            spec
        )))),
        "bootstrap" => Ok(envoy::to_yaml(&envoy::example_bootstrap(spec))),
        other => Err(anyhow::anyhow!(
            "--piece must be filter, cluster, connection-manager, routes or bootstrap, got {other:?}"
        )),
    };
    match &args.piece {
        Some(p) => piece(p),
        None => {
            let mut out = String::new();
            for (name, title) in [
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
            ] {
                out.push_str(&format!("---\n# {title}\n{}", piece(name)?));
            }
            Ok(out)
        }
    }
}
